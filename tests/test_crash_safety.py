"""Batch jobs that get preempted, killed, doubled or fed NaNs: nothing is lost and nothing is
corrupted. Subprocess tests kill real training processes with SIGKILL and SIGTERM."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnnkit.cli import main
from rnnkit.config import load_config
from rnnkit.runs import prepare_trainer
from rnnkit.training.run_lock import RunLockError
from rnnkit.training.interface import TrainingError
from tests.conftest import ROOT, tiny_lm_config, write_yaml
from tests.test_forecast import forecast_config, seasonal_series, write_csv
from tests.test_translation_task import translation_config

TIMING = {"elapsed", "tokens_per_s", "peak_rss_mb"}


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which no two runs share."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------- configs for every task
def _labeling_files(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(1)
    tags, sents = [], []
    for _ in range(30):
        words = [rng.choice(["Ann", "Bob"]), rng.choice(["sees", "likes"]), rng.choice(["a", "the"]),
                 rng.choice(["cat", "dog"])]
        tags += [f"{i + 1}\t{w}\t{'B-PER' if i == 0 else 'O'}" for i, w in enumerate(words)] + [""]
        sents.append(f"{rng.choice(['pos', 'neg'])}\t{' '.join(words)}")
    (tmp_path / "tags.txt").write_text("\n".join(tags) + "\n")
    (tmp_path / "sents.tsv").write_text("\n".join(sents) + "\n")
    return tmp_path / "tags.txt", tmp_path / "sents.tsv"


def task_config(task: str, tmp_path: Path, name: str) -> dict:
    """A tiny config of ``task`` with dropout (so RNG streams matter), 24 steps, evaluations
    every 8, logs every 3."""
    train = {"max_steps": 24, "eval_every": 8, "log_every": 3, "batch_size": 8, "lr": 0.01, "num_threads": 1}
    run = str(tmp_path / name)
    if task == "lm":
        cfg = tiny_lm_config(tmp_path, run_dir=run, model={"dropout": 0.2})
    elif task == "translation":
        cfg = translation_config(tmp_path)
        cfg["run_dir"] = run
        cfg["model"]["encoder"]["dropout"] = cfg["model"]["decoder"]["dropout"] = 0.2
        train["teacher_forcing"] = {"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 20}
    elif task == "translation_heads":      # multi-head attention
        cfg = translation_config(tmp_path)
        cfg["run_dir"] = run
        cfg["model"]["encoder"]["dropout"] = 0.2
        cfg["model"]["decoder"].update(dropout=0.2, attention="additive", attention_heads=4)
        train["teacher_forcing"] = {"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 20}
    elif task in ("tagging", "classification", "classification_hops", "documents"):
        tags, sents = _labeling_files(tmp_path)
        data = {"format": "columns", "train": str(tags), "valid": str(tags), "token_column": 2, "tag_column": 3} \
            if task == "tagging" else {"train": str(sents), "valid": str(sents)}
        model = {"embedding_dim": 8, "hidden_size": 8, "dropout": 0.2, "word_dropout": 0.1}
        if task == "tagging":
            model.update(char_embedding_dim=4, char_hidden_size=4)
        if task == "classification_hops":
            model.update(pooling="attention", attention_hops=3)
            train["attention_penalty"] = 0.3
        if task == "documents":            # the hierarchical network over documents of 1 to 3 sentences
            lines = sents.read_text().splitlines()
            docs = tmp_path / "docs.jsonl"
            docs.write_text("".join(json.dumps({"label": lines[i].split("\t")[0], "sentences": [
                x.split("\t")[1] for x in lines[i:i + 1 + i % 3]]}) + "\n" for i in range(len(lines))))
            data = {"format": "documents", "train": str(docs), "valid": str(docs)}
            model["hierarchical"] = True
        cfg = {"task": "classification" if task != "tagging" else task, "run_dir": run, "seed": 2, "data": data,
               "model": model}
    elif task == "forecast":
        csv_path = tmp_path / "series.csv"
        if not csv_path.exists():
            write_csv(csv_path, seasonal_series(400))
        cfg = forecast_config(tmp_path, csv_path, name, model={"dropout": 0.2, "decoder": "recurrent"})
        train["teacher_forcing"] = {"schedule": "linear", "start": 1.0, "end": 0.0, "steps": 20}
        train["metric"] = "valid_mse"
    else:   # adding, copy
        data = {"length": 10, "valid_size": 32, "test_size": 32, "epoch_batches": 5}
        if task == "copy":
            data.update(length=4, symbols=3, alphabet=4)
        cfg = {"task": task, "run_dir": run, "seed": 2, "data": data,
               "model": {"hidden_size": 8, "num_layers": 2, "dropout": 0.2}}
    cfg.setdefault("train", {}).update(train)
    return cfg


def train_in_process(cfg_path: Path, resume: bool = False, signal_at: int | None = None):
    """Train; with ``signal_at``, this process sends itself SIGTERM during that step."""
    trainer = prepare_trainer(load_config(cfg_path), resume=resume)
    if signal_at is not None:
        step_fn = trainer.task.train_step

        def hooked(batch, index, step):
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(batch, index, step)

        trainer.task.train_step = hooked
    trainer.fit()
    return trainer


@pytest.mark.parametrize("task", ["lm", "translation", "tagging", "classification", "forecast", "adding", "copy",
                                  "translation_heads", "classification_hops", "documents"])
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, task):
    full = write_yaml(tmp_path / "full.yaml", task_config(task, tmp_path, "full"))
    part = write_yaml(tmp_path / "part.yaml", task_config(task, tmp_path, "part"))
    train_in_process(full)
    stopped = train_in_process(part, signal_at=12)       # neither an evaluation nor a log step
    assert stopped.stop_signal == "SIGTERM" and stopped.exit_code == 143
    ckpt = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 13              # the step it was in finished, then it saved
    train_in_process(part, resume=True)
    assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "part" / "last.pt")
    assert_same_weights(tmp_path / "full" / "best.pt", tmp_path / "part" / "best.pt")
    assert records(tmp_path / "full") == records(tmp_path / "part")


@pytest.mark.parametrize("at", [15, 23])     # ends at step 16 (an evaluation), at 24 (the last step)
def test_a_signal_on_an_evaluation_step_puts_the_evaluation_off_to_the_resume(tmp_path, at):
    full = write_yaml(tmp_path / "full.yaml", task_config("lm", tmp_path, "full"))
    part = write_yaml(tmp_path / "part.yaml", task_config("lm", tmp_path, "part"))
    train_in_process(full)
    stopped = train_in_process(part, signal_at=at)
    assert stopped.stop_signal == "SIGTERM"
    ckpt = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert ckpt["progress"]["step"] == at + 1 and ckpt["progress"]["eval_due"]
    assert not [r for r in records(tmp_path / "part") if r["kind"] == "eval" and r["step"] == at + 1]
    train_in_process(part, resume=True)
    assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "part" / "last.pt")
    assert records(tmp_path / "full") == records(tmp_path / "part")


# ---------------------------------------------------------------- real processes, real signals
SLOW_SAVE = """
import sys, time, torch
real_save = torch.save
def slow_save(obj, fh):          # widen the window in which a checkpoint is half-written
    real_save(obj, fh)
    fh.flush()
    time.sleep(0.2)
torch.save = slow_save
from rnnkit.cli import main
main(sys.argv[1:])
"""


def launch(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "train", str(cfg), "--auto-resume", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll ``cond`` until it holds (True) or the process ends first (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("timed out waiting for the training process")


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(x)["step"] for x in lines if x.strip()), default=0)
    except (OSError, ValueError):
        return 0


def half_written(run: Path) -> bool:
    return any(run.glob(".*.pt.*.tmp"))


def long_config(task: str, tmp_path: Path, name: str) -> Path:
    cfg = task_config(task, tmp_path, name)
    cfg["train"].update(max_steps=120 if task == "lm" else 60, eval_every=10 if task == "lm" else 6)
    return write_yaml(tmp_path / f"{name}.yaml", cfg)


@pytest.mark.parametrize("task", ["lm", "translation_heads", "documents"])   # translation_heads: translation too
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, task):
    rng = random.Random()
    reference = launch(long_config(task, tmp_path, "reference"))
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    cfg, run = long_config(task, tmp_path, "killed"), tmp_path / "killed"
    moments = []
    kills = [("after step", lambda: last_step(run) >= target),
             ("during a checkpoint write", lambda: bool(set(run.glob(".*.pt.*.tmp")) - stale)),
             ("after step", lambda: last_step(run) >= target)]
    for what, cond in kills:
        target = last_step(run) + rng.randint(2, 20)
        stale = set(run.glob(".*.pt.*.tmp"))      # left by the previous kill; the new process removes them
        proc = launch(cfg)
        if not wait_for(cond, proc):
            pytest.fail(f"training ended before the kill {what} {target}: {proc.stderr.read()[-500:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        moments.append(f"{what} {target if what == 'after step' else ''} (metrics at step {last_step(run)})")
        assert (run / "last.pt").exists() or not (run / "best.pt").exists()
        if (run / "last.pt").exists():
            torch.load(run / "last.pt", weights_only=True)    # never a torn checkpoint
    # a live run refuses a second writer, naming it
    proc = launch(cfg)
    assert wait_for(lambda: (run / ".lock").read_text().startswith(f"process {proc.pid}"), proc)
    proc.send_signal(signal.SIGSTOP)          # held alive while the second starts (a short run could end first)
    try:
        second = subprocess.run([sys.executable, "-m", "rnnkit", "train", str(cfg), "--auto-resume"], cwd=ROOT,
                                capture_output=True, text=True)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and f"process {proc.pid}" in second.stderr, second.stderr
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert not half_written(run)
    assert_same_weights(tmp_path / "reference" / "last.pt", run / "last.pt")
    assert records(tmp_path / "reference") == records(run), moments


def test_sigterm_saves_the_step_it_stopped_on_and_resume_continues_the_curve(tmp_path):
    ref = launch(long_config("lm", tmp_path, "reference"))
    assert ref.wait(timeout=300) == 0
    cfg, run = long_config("lm", tmp_path, "stopped"), tmp_path / "stopped"
    proc = launch(cfg)
    assert wait_for(lambda: last_step(run) >= 25, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == stopped_at
    assert f"continue with: rnnkit train {cfg} --resume" in err
    again = launch(cfg)
    assert again.wait(timeout=300) == 0
    assert_same_weights(tmp_path / "reference" / "last.pt", run / "last.pt")
    assert records(tmp_path / "reference") == records(run)


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rnnkit.training.run_lock import "
                               "RunLock; RunLock(sys.argv[1]).claim(); print('held', flush=True); time.sleep(60)",
                               str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    cfg = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path))
    with pytest.raises(RunLockError, match=f"in use: process {holder.pid} on "):
        prepare_trainer(load_config(cfg))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]      # nothing written
    holder.kill()
    holder.wait()
    prepare_trainer(load_config(cfg)).fit()                        # the dead holder's lock is taken over
    assert (run / "last.pt").exists()


# ---------------------------------------------------------------- non-finite values
def _poisoned(trainer, steps: set[int] | None = None, start: int | None = None):
    step_fn = trainer.task.train_step

    def hooked(batch, index, step):
        out = step_fn(batch, index, step)
        if (steps and step in steps) or (start is not None and step >= start):
            return out._replace(loss=out.loss * float("nan"))
        return out

    trainer.task.train_step = hooked
    return trainer


def test_non_finite_updates_are_skipped_counted_and_logged(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path))
    trainer = _poisoned(prepare_trainer(load_config(cfg)), steps={3, 4, 11})
    summary = trainer.fit()
    assert summary["nonfinite_skipped"] == 3
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows if r["kind"] == "nonfinite"] == [4, 5, 12]
    assert all(r["loss"] == r["loss"] for r in rows if r["kind"] == "train")       # logged losses stay finite
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run" / "last.pt").values())


def test_non_finite_in_a_row_stops_with_a_clear_message(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path, train={"max_nonfinite": 3}))
    trainer = _poisoned(prepare_trainer(load_config(cfg)), start=12)
    with pytest.raises(TrainingError, match=r"3 non-finite updates in a row \(train.max_nonfinite\) up to step 15"):
        trainer.fit()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["progress"]["step"] == 14      # before the update that failed: a resume redoes it
    assert all(torch.isfinite(w).all() for w in saved["model"].values())


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path))
    trainer = prepare_trainer(load_config(cfg))
    trainer.fit()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.task.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="weights became non-finite"):
        trainer.evaluate_and_save()
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_a_full_disk_during_training_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path))
    with pytest.raises(SystemExit) as done:
        main(["train", str(cfg)])
    assert done.value.code == 0
    before = {p: (tmp_path / "run" / p).read_bytes() for p in ("last.pt", "best.pt")}
    capsys.readouterr()

    def full(obj, fh):
        fh.write(b"x" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit) as done:
        main(["train", str(cfg), "--set", "train.max_steps=40", "--resume"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(r"error: cannot write \S+/run/(best|last)\.pt: No space left on device; the previous "
                        r"\1\.pt is unchanged", err.strip()), err
    assert {p: (tmp_path / "run" / p).read_bytes() for p in before} == before
    assert not list((tmp_path / "run").glob(".*.tmp"))
