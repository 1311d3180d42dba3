"""Data-parallel training under torchrun, on CPU with gloo and two processes: the same weights
as one process with the same global batch, rank 0 alone writes, runs resume across world sizes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, tiny_lm_config, write_yaml
from tests.test_crash_safety import TIMING, records
from tests.test_translation_task import translation_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def torchrun(*args: str, procs: int = 2, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(procs), "-m", "rnnkit", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line names ``marker``, and wait until they are gone."""
    def running() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    for _ in range(100):
        pids = running()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"processes still running: {running()}")


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnkit", *args], cwd=ROOT, capture_output=True, text=True)


def config(task: str, tmp_path: Path, name: str, **train) -> Path:
    settings = {"max_steps": 12, "eval_every": 6, "log_every": 3, "num_threads": 1, **train}
    if task == "lm":
        cfg = tiny_lm_config(tmp_path, run_dir=str(tmp_path / name), train=settings)
    else:
        cfg = translation_config(tmp_path)
        cfg["run_dir"] = str(tmp_path / name)
        cfg["train"].update(settings)
    return write_yaml(tmp_path / f"{name}.yaml", cfg)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("task", ["lm", "translation"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, task):
    two = torchrun("train", str(config(task, tmp_path, "two")))
    one = single("train", str(config(task, tmp_path, "one")))
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-2000:]
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    r1, r2 = records(tmp_path / "one"), records(tmp_path / "two")
    assert [(r["kind"], r["step"]) for r in r1] == [(r["kind"], r["step"]) for r in r2]   # rank 0 alone logs
    for x, y in zip(r1, r2):
        for key in x:
            if isinstance(x[key], float) and key not in TIMING:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt",
                                                                      "metrics.jsonl"]
    assert out.count("step 6: ") == 1      # one rank prints


def test_a_killed_distributed_run_resumes_in_one_process_and_back(tmp_path):
    cfg = config("lm", tmp_path, "run", max_steps=400, eval_every=20, log_every=10)
    proc = torchrun("train", str(cfg))
    run = tmp_path / "run"
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    kill_all(str(cfg))                          # the launcher and both ranks, at once
    proc.wait()
    step = torch.load(run / "last.pt", weights_only=True)["progress"]["step"]
    assert 0 < step < 400
    resumed = single("train", str(cfg), "--resume", "--set", "train.max_steps=440")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["progress"]["step"] == 440
    again = torchrun("train", str(cfg), "--resume", "--set", "train.max_steps=480")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "eval"]
    assert steps == sorted(set(steps)) and steps[-1] == 480          # one record per evaluation, in order


def test_translate_and_eval_split_across_ranks_keep_input_order(tmp_path):
    cfg = config("translation", tmp_path, "run")
    assert single("train", str(cfg)).returncode == 0
    ckpt = str(tmp_path / "run" / "best.pt")
    src = str(ROOT / "data" / "parallel" / "test.en")
    ref = str(ROOT / "data" / "parallel" / "test.fr")
    alone = single("translate", ckpt, "-i", src, "--beam", "2")
    split = torchrun("translate", ckpt, "-i", src, "--beam", "2", "-o", str(tmp_path / "out.fr"))
    _, err = split.communicate(timeout=300)
    assert split.returncode == 0, err[-2000:]
    assert (tmp_path / "out.fr").read_text() == alone.stdout
    scores = torchrun("eval", ckpt, "--src", src, "--ref", ref, "--json")
    out, err = scores.communicate(timeout=300)
    assert scores.returncode == 0, err[-2000:]
    one = json.loads(single("eval", ckpt, "--src", src, "--ref", ref, "--json").stdout)
    assert json.loads(out) == pytest.approx(one)
