"""Around the loop: TensorBoard scalars, curves and run comparison, checkpoint averaging,
model cards and shell completion."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import load_config
from rnnkit.runs import prepare_trainer
from rnnkit.training.checkpoint import save_checkpoint
from tests.conftest import tiny_lm_config, write_yaml

runner = CliRunner()


def train(tmp_path, name="run", resume=False, **sections):
    cfg = write_yaml(tmp_path / f"{name}.yaml", tiny_lm_config(tmp_path, run_dir=str(tmp_path / name), **sections))
    result = runner.invoke(app, ["train", str(cfg), *(["--resume"] if resume else [])])
    assert result.exit_code == 0, result.output
    return tmp_path / name


def tensorboard_scalars(run) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_every_logged_scalar_without_duplicates_after_a_resume(tmp_path):
    run = train(tmp_path, train={"tensorboard": True, "max_steps": 20})
    at_20 = (run / "last.pt").read_bytes()
    trainer = prepare_trainer(load_config(tmp_path / "run.yaml", ["train.tensorboard=true", "train.max_steps=30"]),
                              resume=True)
    trainer.fit()
    # as if the session had crashed after logging steps 25 and 30 but before saving step 30
    (run / "last.pt").write_bytes(at_20)
    trainer = prepare_trainer(load_config(tmp_path / "run.yaml", ["train.tensorboard=true", "train.max_steps=40"]),
                              resume=True)
    trainer.fit()
    steps = tensorboard_scalars(run)
    assert steps["train/loss"] == list(range(5, 41, 5))
    assert steps["eval/valid_loss"] == [10, 20, 30, 40]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/valid_ppl"} <= set(steps)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert all(logged[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in rows if r["kind"] == "train")


def test_plot_and_runs_for_one_and_several_runs(tmp_path):
    a = train(tmp_path, "a")
    b = train(tmp_path, "b", model={"hidden_size": 16})
    for runs, png in (([a], "one.png"), ([a, b], "two.png")):
        result = runner.invoke(app, ["plot", *map(str, runs), "-o", str(tmp_path / png), "--metric", "valid_ppl"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["plot", str(a), "--metric", "valid_bleu", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "no valid_bleu" in result.output
    rows = json.loads(runner.invoke(app, ["runs", str(a), str(b), "--json"]).stdout)
    assert [r["differs"] for r in rows] == ["model.hidden_size=32", "model.hidden_size=16"]
    assert rows[0]["steps"] == 20 and rows[0]["best_step"] in (10, 20) and rows[0]["metric"] == "valid_loss"
    # the folder holding both runs (and something that is not a run) stands for the two runs
    (tmp_path / "notes.txt").write_text("not a run")
    rows = json.loads(runner.invoke(app, ["runs", str(tmp_path), "--json"]).stdout)
    assert [Path(r["run"]).name for r in rows] == ["a", "b"]
    result = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "all.png")])
    assert result.exit_code == 0 and "of 2 runs" in result.output, result.output
    result = runner.invoke(app, ["runs", str(tmp_path / "a" / "tensorboard-none")])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output


def test_average_is_the_elementwise_mean_and_refuses_other_shapes(tmp_path):
    a = train(tmp_path, "a", train={"max_steps": 10})
    train(tmp_path, "a", resume=True, train={"max_steps": 20})
    first = torch.load(a / "best.pt", weights_only=True)
    last = torch.load(a / "last.pt", weights_only=True)
    save_checkpoint({k: v for k, v in first.items() if k not in ("format", "rnnkit_version")}, tmp_path / "s10.pt")
    result = runner.invoke(app, ["average", str(tmp_path / "s10.pt"), str(a / "last.pt"), "-o",
                                 str(tmp_path / "avg.pt")])
    assert result.exit_code == 0, result.output
    avg = torch.load(tmp_path / "avg.pt", weights_only=True)["model"]
    for k in avg:
        assert torch.allclose(avg[k], (first["model"][k] + last["model"][k]) / 2)
    assert runner.invoke(app, ["generate", str(tmp_path / "avg.pt"), "-n", "5"]).exit_code == 0
    other = train(tmp_path, "b", model={"hidden_size": 16})
    result = runner.invoke(app, ["average", str(a / "last.pt"), str(other / "last.pt"), "-o", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "another task or model" in result.output
    assert not (tmp_path / "x.pt").exists()


def test_info_matches_the_checkpoint(tmp_path):
    run = train(tmp_path)
    card = json.loads(runner.invoke(app, ["info", str(run / "last.pt"), "--json"]).stdout)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert card["task"] == "lm" and card["steps"] == 20
    assert card["parameters"] == sum(t.numel() for t in ckpt["model"].values())
    assert card["vocab_size"] == len(ckpt["task"]["vocab"])
    assert card["best_valid_loss"] == ckpt["progress"]["best"]
    assert card["continue_with"] == f"rnnkit train {run / 'config.yaml'} --resume"
    assert card["torch_version"] == torch.__version__


def test_shell_completion_script(monkeypatch):
    import typer.completion

    # the flag takes the shell from the process tree; pin it, so the test does not depend on
    # what started pytest (make, CI's runner, a terminal)
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    result = runner.invoke(app, ["--show-completion"])
    assert result.exit_code == 0 and "_rnnkit_completion" in result.stdout.replace("-", "_"), result.output


def test_translate_with_a_terminal_answers_each_line_as_it_is_typed(tmp_path):
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    from tests.test_translation_task import translation_config

    cfg = write_yaml(tmp_path / "t.yaml", translation_config(tmp_path))
    assert runner.invoke(app, ["train", str(cfg)]).exit_code == 0
    ckpt = tmp_path / "run" / "best.pt"
    expected = runner.invoke(app, ["translate", str(ckpt)], input="the cat sleeps\n").stdout.strip()
    assert expected
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rnnkit", "translate", str(ckpt)], cwd=ROOT,
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)

    def read_until(text: str, timeout: float = 60.0) -> str:
        seen, end = "", time.time() + timeout
        while text not in seen and time.time() < end:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    seen += os.read(leader, 4096).decode(errors="replace")
                except OSError:
                    break
        return seen

    try:
        assert "> " in read_until("> ")                   # a prompt, before any input
        os.write(leader, b"the cat sleeps\n")
        answer = read_until(expected + "\r\n> ")          # the translation, then the next prompt
        assert expected in answer
        os.write(leader, b"\x04")                         # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(leader)
