from __future__ import annotations

import json
import math

import pytest
import torch

from rnnkit.config import load_config
from rnnkit.models.language_model import RNNLanguageModel
from rnnkit.runs import load_task, prepare_trainer
from tests.conftest import overfit_tiny_batch, tiny_lm_config, write_yaml


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_every_cell_overfits_a_tiny_batch(cell):
    torch.manual_seed(0)
    loss = overfit_tiny_batch(RNNLanguageModel(12, cell, 16, 48, 2, 0.0, tie_weights=False))
    assert loss < 0.05, f"{cell} did not overfit: loss {loss:.3f}"


def test_tied_weights_share_one_matrix():
    model = RNNLanguageModel(20, "gru", 24, 32, 1, 0.0, tie_weights=True)
    assert model.output.weight is model.embedding.weight
    logits, _ = model(torch.randint(0, 20, (2, 5)))
    assert logits.shape == (2, 5, 20)


def _train(tmp_path, name, overrides=(), resume=False, **sections):
    cfg_dict = tiny_lm_config(tmp_path, run_dir=str(tmp_path / name), **sections)
    cfg = load_config(write_yaml(tmp_path / f"{name}.yaml", cfg_dict), list(overrides))
    trainer = prepare_trainer(cfg, resume=resume)
    trainer.fit()
    return tmp_path / name


def _train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_resume_continues_the_same_loss_curve(tmp_path):
    sections = {"model": {"dropout": 0.3, "num_layers": 2},  # dropout: the RNG state must be restored
                "train": {"max_steps": 24, "log_every": 1, "eval_every": 6, "lr_schedule": "plateau"}}
    full = _train(tmp_path, "full", **sections)
    part = _train(tmp_path, "part", ["train.max_steps=12"], **sections)
    assert len(_train_losses(part)) == 12
    _train(tmp_path, "part", resume=True, **sections)
    a, b = _train_losses(full), _train_losses(part)
    assert [s for s, _ in b] == list(range(1, 25))
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], rel=1e-5, abs=1e-6)


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    sections = {"train": {"max_steps": 10, "log_every": 1, "eval_every": 5}}
    run = _train(tmp_path, "r", ["train.max_steps=5"], **sections)
    with (run / "metrics.jsonl").open("a") as fh:  # a crashed session logged steps 6-7, never saved
        fh.write(json.dumps({"kind": "train", "step": 6, "loss": 99.0}) + "\n")
        fh.write(json.dumps({"kind": "train", "step": 7, "loss": 99.0}) + "\n")
    _train(tmp_path, "r", resume=True, **sections)
    losses = dict(_train_losses(run))
    assert sorted(losses) == list(range(1, 11)) and 99.0 not in losses.values()


def test_new_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    from rnnkit.config import ConfigError
    _train(tmp_path, "once")
    with pytest.raises(ConfigError, match="already holds a run"):
        _train(tmp_path, "once")
    with pytest.raises(ConfigError, match="does not exist"):
        _train(tmp_path, "never", resume=True)
    with pytest.raises(ConfigError, match="model.hidden_size: differs from the checkpoint"):
        _train(tmp_path, "once", ["model.hidden_size=64"], resume=True)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    run = _train(tmp_path, "ckpt", model={"cell": "gru", "tie_weights": True, "embedding_dim": 32})
    task = load_task(run / "last.pt", "cpu")
    from rnnkit.training.checkpoint import load_checkpoint
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["model"]["cell"] == "gru" and ckpt["task"]["vocab"][0] == "<unk>"
    fresh = RNNLanguageModel(len(ckpt["task"]["vocab"]), "gru", 32, 32, 1, 0.0, True)
    fresh.load_state_dict(ckpt["model"])
    fresh.eval()
    x = torch.randint(0, len(ckpt["task"]["vocab"]), (3, 17))
    with torch.no_grad():
        assert torch.equal(task.model(x)[0], fresh(x)[0])


def test_best_checkpoint_follows_the_metric(tmp_path):
    run = _train(tmp_path, "best", train={"max_steps": 30, "eval_every": 10})
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    best = min(evals, key=lambda r: r["valid_loss"])
    from rnnkit.training.checkpoint import load_checkpoint
    assert load_checkpoint(run / "best.pt")["progress"]["step"] == best["step"]
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 30


def test_generation_is_reproducible_with_a_seed(tmp_path):
    run = _train(tmp_path, "gen")
    task = load_task(run / "last.pt", "cpu")

    def sample(seed, **kw):
        return "".join(task.generate("The ", 60, seed=seed, **kw))

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)
    assert len(sample(1, top_k=3)) == 60
    greedyish = {sample(s, top_k=1) for s in range(3)}
    assert len(greedyish) == 1   # top-k 1 is greedy whatever the seed


def test_word_level_model_trains_and_generates_words(tmp_path):
    run = _train(tmp_path, "word", data={"tokenizer": "word", "bptt": 8})
    task = load_task(run / "last.pt", "cpu")
    assert "</s>" in task.vocab.stoi and "lamp" in task.vocab.stoi
    text = "".join(task.generate("the", 20, seed=0))
    assert all(w in task.vocab.stoi for w in text.split())
    metrics = task.evaluate_text("the lamp was lit at dusk\n" * 20)
    assert metrics["tokens"] > 0 and "bpc" not in metrics


def test_bits_per_character_matches_loss(tmp_path):
    run = _train(tmp_path, "bpc")
    task = load_task(run / "last.pt", "cpu")
    m = task.evaluate_text("The lamp on the harbour wall was lit at dusk. " * 10)
    assert m["bpc"] == pytest.approx(m["loss"] / 0.6931471805599453)
    assert m["ppl"] == pytest.approx(2.718281828459045 ** m["loss"], rel=1e-6)


def test_truncated_bptt_carries_detached_state(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path)))
    from rnnkit.tasks.language_model import build
    task = build(cfg, torch.device("cpu"))
    batches = task.train_batches(0)
    task.train_step(batches[0], 0, 0)
    first = task.state
    assert all(not s.requires_grad for s in first)
    task.train_step(batches[1], 1, 1)
    assert not torch.equal(first[0], task.state[0])
    task.model.eval()  # no dropout: the same window from a fresh state gives the same state
    task.train_step(batches[0], 0, 2)  # index 0: a new epoch starts from a zero state
    restart = task.state
    task.state = None
    task.train_step(batches[0], 5, 3)
    assert torch.allclose(restart[0], task.state[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: mixed precision is GPU-only")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_learns_and_resumes(tmp_path, precision):
    sections = {"train": {"max_steps": 40, "log_every": 10, "eval_every": 20, "precision": precision,
                          "device": "cuda"}}
    run = _train(tmp_path, precision, ["train.max_steps=20"], **sections)
    _train(tmp_path, precision, resume=True, **sections)
    losses = [loss for _, loss in _train_losses(run)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    from rnnkit.training.checkpoint import load_checkpoint
    scaler = load_checkpoint(run / "last.pt")["scaler"]
    assert bool(scaler) == (precision == "fp16")


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    from rnnkit.config import ConfigError
    with pytest.raises(ConfigError, match="train.precision: 'fp16' needs a CUDA device"):
        _train(tmp_path, "cpu16", ["train.precision=fp16", "train.device=cpu"])
    assert not (tmp_path / "cpu16").exists()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_in_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, native):
    import rnnkit.hardware
    import rnnkit.training.trainer as trainer_module
    monkeypatch.setattr(rnnkit.hardware, "native_bf16", lambda: native)
    monkeypatch.setattr(rnnkit.hardware, "onednn_bf16_lstm", lambda: True)
    dtypes = []
    real = trainer_module.autocast

    def recording(device_type, dtype):
        dtypes.append(dtype)
        return real(device_type, dtype)

    monkeypatch.setattr(trainer_module, "autocast", recording)
    cfg_dict = tiny_lm_config(tmp_path, run_dir=str(tmp_path / "auto"))
    cfg = load_config(write_yaml(tmp_path / "auto.yaml", cfg_dict),
                      ["train.precision=auto", "train.device=cpu", "train.max_steps=4"])
    summary = prepare_trainer(cfg).fit()
    assert summary["precision"] == ("bf16" if native else "fp32")
    assert dtypes and set(dtypes) == {torch.bfloat16} if native else not dtypes


def test_early_stopping_ends_a_run_without_improvement(tmp_path):
    # "max" on a falling loss: no evaluation after the first counts as an improvement
    run = _train(tmp_path, "early", train={"max_steps": 100, "eval_every": 5, "early_stopping": 2,
                                           "metric_mode": "max"})
    evals = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "eval"]
    assert evals == [5, 10, 15]


def test_budget_decay_reaches_the_floor_when_time_runs_out(tmp_path):
    """decay_by: budget takes the trainer's clock: a run stopped by max_time long before
    max_steps ends its cosine near zero; by steps it would still be near its peak."""
    run = _train(tmp_path, "budget", train={"max_steps": 100_000, "max_time": 1.5, "log_every": 1,
                                            "eval_every": 100_000, "lr_schedule": "cosine", "decay_by": "budget"})
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert len(lrs) > 20 and lrs[0] > 0.009 and lrs[-1] < 0.0005
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_evaluation_runs_without_the_last_steps_gradients(tmp_path):
    """The gradients of the step before an evaluation are dropped first, so the evaluation's
    tensors reuse their memory (the next step makes its own)."""
    cfg = load_config(write_yaml(tmp_path / "g.yaml", tiny_lm_config(tmp_path, train={"max_steps": 4,
                                                                                      "eval_every": 4})))
    trainer = prepare_trainer(cfg)
    trainer.fit()
    assert all(p.grad is None for p in trainer.task.model.parameters())
