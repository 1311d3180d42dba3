"""The adding and copy tasks, and gradient flow through time."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import load_config
from rnnkit.gradient_flow import fit_decay
from rnnkit.runs import load_task, prepare_trainer
from rnnkit.tasks.adding import generate_adding
from rnnkit.tasks.copying import generate_copy
from tests.conftest import tiny_lm_config, write_yaml

runner = CliRunner()


def memory_config(tmp_path, task="adding", name="run", **sections) -> dict:
    data = {"length": 12, "valid_size": 64, "test_size": 64}
    if task == "copy":
        data.update(length=6, symbols=3, alphabet=4)
    cfg = {"task": task, "run_dir": str(tmp_path / name), "seed": 5, "data": data,
           "model": {"cell": "gru", "hidden_size": 16},
           "train": {"batch_size": 16, "eval_batch_size": 32, "max_steps": 20, "log_every": 5, "eval_every": 10,
                     "lr": 0.01}}
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def train(tmp_path, task="adding", name="run", overrides=(), resume=False, **sections):
    path = write_yaml(tmp_path / f"{name}.yaml", memory_config(tmp_path, task, name, **sections))
    trainer = prepare_trainer(load_config(path, list(overrides)), resume=resume)
    trainer.fit()
    return tmp_path / name


def records(run, kind):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_adding_generator_has_the_documented_baseline():
    x, y = generate_adding(40000, 50, torch.Generator().manual_seed(0))
    markers = x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((40000,), 2.0))
    assert torch.equal(markers[:, :25].sum(1), torch.ones(40000))        # one marker in each half
    assert torch.allclose((x[..., 0] * markers).sum(1), y)
    assert ((y - 1.0) ** 2).mean().item() == pytest.approx(1 / 6, abs=0.004)


def test_copy_generator_layout_and_uniform_symbols():
    x, y = generate_copy(20000, 5, 7, 8, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 2 * 5 + 7) and y.shape == (20000, 5)
    assert torch.equal(x[:, :5], y + 1)
    assert torch.all(x[:, 5:12] == 0) and torch.all(x[:, 12] == 9) and torch.all(x[:, 13:] == 0)
    freq = torch.bincount(y.flatten(), minlength=8).float() / y.numel()
    assert torch.allclose(freq, torch.full((8,), 1 / 8), atol=0.01)   # guessing scores 1/A and log A


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_memory_tasks_learn_and_report_their_baseline(tmp_path, task):
    run = train(tmp_path, task, train={"max_steps": 60, "eval_every": 30})
    evals = records(run, "eval")
    if task == "adding":
        assert evals[-1]["valid_baseline_mse"] == pytest.approx(1 / 6, abs=0.06)
        assert evals[-1]["valid_mse"] < evals[-1]["valid_baseline_mse"]
    else:
        assert evals[-1]["valid_baseline_loss"] == pytest.approx(math.log(4))
        assert evals[-1]["valid_baseline_accuracy"] == 0.25
        assert evals[-1]["valid_loss"] < math.log(4)


def test_fresh_batches_are_reproducible_on_resume(tmp_path):
    sections = {"train": {"max_steps": 12, "log_every": 1, "eval_every": 6}, "model": {"dropout": 0.3,
                                                                                      "num_layers": 2}}
    full = train(tmp_path, name="full", **sections)
    part = train(tmp_path, name="part", overrides=["train.max_steps=6"], **sections)
    train(tmp_path, name="part", resume=True, **sections)
    a, b = records(full, "train"), records(part, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)


def test_test_set_is_fixed_by_the_seed_and_differs_from_validation(tmp_path):
    run = train(tmp_path)
    one, two = load_task(run / "last.pt", "cpu"), load_task(run / "last.pt", "cpu")
    assert torch.equal(one.split("test")[0], two.split("test")[0])
    assert not torch.equal(one.split("test")[0], one.split("valid")[0])
    assert one.evaluate_split("test") == two.evaluate_split("test")


@pytest.mark.parametrize("a", [0.5, 0.9])
def test_vanilla_rnn_gradient_decays_by_its_recurrent_factor(tmp_path, a):
    run = train(tmp_path, overrides=["model.cell=rnn_tanh", "model.hidden_size=8", "train.max_steps=1"])
    task = load_task(run / "last.pt", "cpu")
    with torch.no_grad():   # W_hh = a I and tiny input weights keep tanh in its linear range
        rnn = task.model.rnn
        rnn.weight_hh_l0.copy_(a * torch.eye(8))
        rnn.weight_ih_l0.mul_(1e-4)
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    flow = task.gradient_flow()
    assert flow.distances == list(range(12)) and len(flow.norms) == 12
    assert all(math.isfinite(n) and n > 0 for n in flow.norms)
    ratios = [flow.norms[d + 1] / flow.norms[d] for d in range(11)]
    assert ratios == pytest.approx([a] * 11, rel=1e-3)
    assert flow.decay == pytest.approx(a, rel=1e-3)


def test_fit_decay_recovers_a_geometric_rate():
    assert fit_decay([3 * 0.7 ** d for d in range(20)]) == pytest.approx(0.7)
    assert math.isnan(fit_decay([1.0]))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_gradient_flow_is_logged_during_training_and_keeps_training_exact(tmp_path, cell):
    over = [f"model.cell={cell}", "train.log_every=1"]
    plain = train(tmp_path, name="plain", overrides=over)
    flowed = train(tmp_path, name="flowed", overrides=over + ["train.gradient_flow_every=5"])
    logged = records(flowed, "gradient_flow")
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert all(r["distance"] == 11 and math.isfinite(r["decay"]) and r["grad_norm_at_loss"] > 0 for r in logged)
    assert [r["loss"] for r in records(plain, "train")] == [r["loss"] for r in records(flowed, "train")]


def test_language_model_gradient_flow_from_the_config(tmp_path):
    path = write_yaml(tmp_path / "lm.yaml", tiny_lm_config(tmp_path, train={"gradient_flow_every": 10}))
    trainer = prepare_trainer(load_config(path))
    trainer.fit()
    logged = records(tmp_path / "run", "gradient_flow")
    assert [r["step"] for r in logged] == [10, 20] and logged[0]["distance"] == 15


def test_eval_prints_gradient_flow_and_draws_it(tmp_path):
    run = train(tmp_path, "copy", overrides=["model.impl=explicit", "model.layer_norm=true"])
    result = runner.invoke(app, ["eval", str(run / "last.pt"), "--gradient-flow", "--plot", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(3 + 6 + 1))    # back from the recall marker
    assert all(math.isfinite(float(r[1])) for r in rows)
    assert "decay per step:" in result.stdout
    assert (tmp_path / "f.png").stat().st_size > 1000
    plain = runner.invoke(app, ["eval", str(run / "last.pt"), "--json"])
    scores = json.loads(plain.stdout)
    assert set(scores) == {"loss", "accuracy", "baseline_loss", "baseline_accuracy"}


def test_translation_encoder_gradient_flow(tmp_path):
    from tests.test_translation_task import train as train_translation
    ckpt = train_translation(tmp_path, train={"gradient_flow_every": 3})
    logged = records(ckpt.parent, "gradient_flow")
    assert [r["step"] for r in logged] == [3, 6]
    result = runner.invoke(app, ["eval", str(ckpt), "--gradient-flow", "--json"])
    assert result.exit_code == 0, result.output
    flow = json.loads(result.stdout)
    assert flow["distances"] == list(range(len(flow["norms"]))) and len(flow["norms"]) >= 3
    assert all(math.isfinite(n) and n > 0 for n in flow["norms"])


def test_plot_without_gradient_flow_and_bad_interval_are_clear_errors(tmp_path):
    from rnnkit.config import ConfigError
    result = runner.invoke(app, ["eval", "missing.pt", "--plot", "x.png"])
    assert result.exit_code == 2 and "add --gradient-flow" in result.output
    with pytest.raises(ConfigError, match="train.gradient_flow_every"):
        load_config(write_yaml(tmp_path / "u.yaml", tiny_lm_config(tmp_path)), ["train.gradient_flow_every=0"])
