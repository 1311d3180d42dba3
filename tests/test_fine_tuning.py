"""Fine-tuning controls of the shared loop: layer-wise learning rates, gradual unfreezing and
the slanted triangular schedule (ULMFiT), for every task whose model has layer groups."""
from __future__ import annotations

import json

import pytest
import torch

from rnnkit.config import ConfigError, TrainConfig, load_config
from rnnkit.runs import prepare_trainer
from rnnkit.training.schedules import LRSchedule
from tests.conftest import tiny_lm_config, write_yaml

SECTIONS = {"model": {"num_layers": 2, "embedding_dim": 16, "hidden_size": 16},
            "train": {"max_steps": 9, "log_every": 1, "eval_every": 3}}


def _trainer(tmp_path, name="run", overrides=(), resume=False, **sections):
    merged = {k: {**SECTIONS.get(k, {}), **sections.get(k, {})} for k in {*SECTIONS, *sections}}
    cfg = load_config(write_yaml(tmp_path / f"{name}.yaml",
                                 tiny_lm_config(tmp_path, run_dir=str(tmp_path / name), **merged)), list(overrides))
    return prepare_trainer(cfg, resume=resume)


def test_layer_learning_rates_follow_the_decay(tmp_path):
    trainer = _trainer(tmp_path, train={"layer_lr_decay": 0.5, "lr": 0.01, "max_steps": 1})
    groups = trainer.optimizer.param_groups
    model = trainer.task.model
    assert [len(g["params"]) for g in groups] == [len(g) for g in model.layer_groups()]
    assert groups[0]["params"][0] is model.embedding.weight and groups[-1]["params"][-1] is model.output.bias
    trainer.fit()
    assert [g["lr"] for g in groups] == pytest.approx([0.01 * 0.5 ** 3, 0.01 * 0.5 ** 2, 0.01 * 0.5, 0.01])


def test_gradual_unfreezing_keeps_lower_layers_bit_identical_until_their_turn(tmp_path):
    trainer = _trainer(tmp_path, train={"unfreeze_every": 2, "max_steps": 1, "weight_decay": 0.1,
                                        "optimizer": "adamw"})
    groups = [list(g) for g in trainer.task.model.layer_groups()]        # embedding, layer 0, layer 1, output
    before = [[q.detach().clone() for q in g] for g in groups]
    changed = []
    for steps in range(1, 8):
        trainer.cfg.train.max_steps = steps
        trainer.fit()
        changed.append([not all(torch.equal(a, b) for a, b in zip(g, old)) for g, old in zip(groups, before)])
    # steps 1-2 train the output only, 3-4 also the top layer, 5-6 also layer 0, 7 everything
    assert changed[1] == [False, False, False, True]
    assert changed[3] == [False, False, True, True]
    assert changed[5] == [False, True, True, True]
    assert changed[6] == [True, True, True, True]


def test_slanted_triangular_schedule():
    cfg = TrainConfig(lr=0.32, lr_schedule="slanted_triangular", max_steps=100)
    s = LRSchedule(cfg)
    rates = [s.lr(step) for step in range(100)]
    assert rates[9] == pytest.approx(0.32)                 # peak at the end of the first 10%
    assert rates[0] == pytest.approx(0.32 * (1 + 31 * 0.1) / 32)
    assert max(rates) == rates[9] and rates[-1] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10])) and all(a > b for a, b in zip(rates[9:], rates[10:]))


def test_resume_is_exact_with_every_fine_tuning_control(tmp_path):
    train = {"layer_lr_decay": 0.4, "unfreeze_every": 2, "lr_schedule": "slanted_triangular", "max_steps": 12,
             "eval_every": 3}
    full = _trainer(tmp_path, "full", train=train)
    full.fit()
    part = _trainer(tmp_path, "part", train=train)
    step = part._step

    def stop_after_six(*args):    # as SIGTERM would (a shorter max_steps would change the schedule)
        out = step(*args)
        if part.progress.step == 6:
            part.stop_signal = "SIGTERM"
        return out

    part._step = stop_after_six
    part.fit()
    assert part.progress.step == 6
    resumed = _trainer(tmp_path, "part", resume=True, train=train)
    resumed.fit()
    losses = {}
    for name in ("full", "part"):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["step"], r["loss"], r["lr"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _, _ in losses["full"]] == list(range(1, 13)) == [s for s, _, _ in losses["part"]]
    assert [x for _, x, _ in losses["full"]] == pytest.approx([x for _, x, _ in losses["part"]], rel=1e-5)
    lrs = [lr for _, _, lr in losses["full"]]
    assert len(set(lrs)) > 4                      # the slanted triangle moves the rate every step
    assert lrs == pytest.approx([lr for _, _, lr in losses["part"]], rel=1e-9)
    groups = [[g["lr"] for g in t.optimizer.param_groups] for t in (full, resumed)]
    assert len(groups[0]) > 2 and len(set(groups[0])) > 2      # one rate per layer group, decayed downwards
    assert groups[0] == pytest.approx(groups[1], rel=1e-9)
    trainable = [[p.requires_grad for p in t.task.model.parameters()] for t in (full, resumed)]
    assert trainable[0] == trainable[1]           # the same layers unfrozen at the end


def test_a_model_without_layers_is_a_clear_error(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"task": "copy", "run_dir": str(tmp_path / "c"),
                                                       "train": {"layer_lr_decay": 0.5}}))
    with pytest.raises(ConfigError, match="train.layer_lr_decay"):
        prepare_trainer(cfg)
