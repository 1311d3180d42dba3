"""Prove rnnkit's CUDA paths in one go: the first thing to run on a GPU machine (bench/gpu_check.sh).

Stages, each bounded in time, each a row of one table (written to OUT/gpu_check.md):

1. the test suite on the GPU: ``train.device: auto`` picks CUDA, so every task's training and
   inference tests run there, with the CUDA-only mixed-precision tests;
2. a short CUDA training run of every task (LM, translation, tagging, classification,
   forecasting, the copy task) in fp32, bf16 and fp16 (with its loss scaler), each resumed
   for a few steps and then used for inference from its checkpoint;
3. torchrun with 2 ranks (NCCL) where 2 GPUs exist;
4. the LM and translation throughput benchmarks on the GPU (they need the corpora: put
   ../shared/data's tinyshakespeare and multi30k into ./shared/data to carry them along), and
   the scan cells' training speed against the fused LSTM (bench/cells.py, no corpora).

    bash bench/gpu_check.sh [--budget 450]
"""
from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class Check:
    def __init__(self, out: Path, budget: float):
        self.out, self.deadline = out, time.time() + budget
        self.rows: list[tuple[str, str, float, str]] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None,
            summary=lambda text: "") -> bool:
        """Run ``cmd``; one row: ok/FAILED/TIMEOUT/skipped, seconds, and what ``summary`` reads in its output."""
        timeout = min(timeout, self.left())
        if timeout < 5:
            self.rows.append((name, "skipped", 0.0, "the time budget is spent"))
            return False
        log = self.out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] + ".log")
        start = time.perf_counter()
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                 env={**os.environ, **(env or {})})
            text, code = res.stdout + res.stderr, res.returncode
            status = "ok" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired as err:
            text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            status = "TIMEOUT"
        seconds = time.perf_counter() - start
        log.write_text(" ".join(cmd) + "\n\n" + text)
        detail = summary(text) if status == "ok" else (text.strip().splitlines() or [""])[-1][:160]
        self.rows.append((name, status, seconds, detail))
        print(f"{status:>8}  {seconds:6.1f} s  {name}  {detail}", flush=True)
        return status == "ok"


def write_task_data(folder: Path) -> dict[str, dict]:
    """Small configs for every task, on the bundled sample data and generated files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "the a cat dog sees bird small sings red car walks".split()
    rows, labels = [], []
    for _ in range(400):
        sent = [rng.choice(words) for _ in range(rng.randint(3, 9))]
        rows += [f"{w}\t{'NOUN' if w in ('cat', 'dog', 'bird', 'car') else 'X'}" for w in sent] + [""]
        labels.append(f"{'pos' if 'cat' in sent else 'neg'}\t{' '.join(sent)}")
    (folder / "tags.txt").write_text("\n".join(rows) + "\n")
    (folder / "labels.tsv").write_text("\n".join(labels) + "\n")
    lines = ["date,load"] + [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{(i % 24) / 24 + rng.random() * 0.1:.4f}"
                             for i in range(24 * 28)]
    (folder / "series.csv").write_text("\n".join(lines) + "\n")
    small = {"embedding_dim": 32, "hidden_size": 32, "num_layers": 1}
    train = {"max_steps": 30, "eval_every": 15, "log_every": 5, "batch_size": 16}
    return {
        "lm": {"task": "lm", "data": {"path": str(ROOT / "data" / "harbour.txt"), "split": [0.8, 0.2, 0.0],
                                      "tokenizer": "char", "bptt": 32}, "model": {"cell": "lstm", **small},
               "train": train},
        "translation": {**yaml.safe_load((ROOT / "configs" / "translate_sample.yaml").read_text()),
                        "train": {**train, "metric": "valid_bleu", "metric_mode": "max"}},
        "tagging": {"task": "tagging", "data": {"format": "columns", "train": str(folder / "tags.txt"),
                                                "valid": str(folder / "tags.txt"), "token_column": 1,
                                                "tag_column": 2}, "model": {**small, "output": "crf"},
                    "train": train},
        "classification": {"task": "classification", "data": {"train": str(folder / "labels.tsv"),
                                                              "valid": str(folder / "labels.tsv")},
                           "model": {**small, "pooling": "attention"}, "train": train},
        "forecast": {"task": "forecast", "data": {"path": str(folder / "series.csv"), "split": [0.7, 0.85, 1.0],
                                                  "input_length": 48, "horizon": 24, "season": 24},
                     "model": {"cell": "gru", "hidden_size": 32, "segment": 4}, "train": train},
        "copy": {**yaml.safe_load((ROOT / "configs" / "copy.yaml").read_text()), "train": train},
    }


def inference(task: str, ckpt: Path, folder: Path) -> list[str]:
    if task == "lm":
        return ["generate", str(ckpt), "--prime", "The", "--length", "50", "--seed", "1"]
    if task == "translation":
        return ["eval", str(ckpt), "--src", str(ROOT / "data/parallel/test.en"),
                "--ref", str(ROOT / "data/parallel/test.fr"), "--beam", "5"]
    if task in ("tagging", "classification"):
        return ["eval", str(ckpt), "--data", str(folder / ("tags.txt" if task == "tagging" else "labels.tsv"))]
    if task == "forecast":
        return ["predict", str(ckpt), "--data", str(folder / "series.csv")]
    return ["info", str(ckpt)]


def best_metric(text: str) -> str:
    """``best_valid_x = v at step n`` from a run's summary table."""
    cells = {}
    for line in text.splitlines():
        parts = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if len(parts) == 2:
            cells[parts[0]] = parts[1]
    best = next((k for k in cells if k.startswith("best_") and k != "best_step"), None)
    return f"{best} {cells[best]} at step {cells.get('best_step', '?')}" if best else ""


def last_line_with(word: str):
    return lambda text: next((ln.strip()[:120] for ln in reversed(text.splitlines()) if word in ln), "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 7.5 minutes)")
    ap.add_argument("--dry-run-on-cpu", action="store_true",
                    help="stage 2 only, on the CPU in fp32: checks this script's configs where no GPU is")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    dry = args.dry_run_on_cpu
    if not torch.cuda.is_available() and not dry:
        print("skipped: no CUDA device here (this check is for GPU machines; --dry-run-on-cpu checks the script)")
        return 0
    gpus = torch.cuda.device_count()
    device = (f"{torch.cuda.get_device_name(0)} x{gpus}, torch {torch.__version__}, CUDA {torch.version.cuda}"
              if not dry else f"CPU dry run, torch {torch.__version__}")
    print(f"device: {device}", flush=True)
    check = Check(args.out, args.budget)

    if not dry:
        suite(check)        # 1. the suite on the GPU

    # 2. every task in each precision: train, resume, infer; the tasks side by side
    folder = args.out / "data"
    precisions = ("fp32",) if dry else ("fp32", "bf16", "fp16")

    def chain(task: str, base: dict) -> None:
        for precision in precisions:
            run_dir = args.out / "runs" / f"{task}-{precision}"
            cfg = {**base, "run_dir": str(run_dir), "train": {**base["train"], "device": "cpu" if dry else "cuda",
                                                                "precision": precision}}
            path = args.out / f"{task}-{precision}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            name = f"{task} {precision}"
            ok = check.run(f"{name}: train 30 steps", [PY, "-m", "rnnkit", "train", str(path)], 90,
                           summary=best_metric)
            ok = ok and check.run(f"{name}: resume to 40", [PY, "-m", "rnnkit", "train", str(run_dir / "config.yaml"),
                                                           "--resume", "--set", "train.max_steps=40"], 90,
                                  summary=best_metric)
            if ok:
                check.run(f"{name}: inference from best.pt",
                          [PY, "-m", "rnnkit", *inference(task, run_dir / "best.pt", folder)], 90)

    with ThreadPoolExecutor(2 if dry else 6) as pool:
        list(pool.map(lambda item: chain(*item), write_task_data(folder).items()))
    if not dry:
        distributed_and_speed(check, gpus, args.out)
    return report(check, device, args.out)


def suite(check: Check) -> None:
    """The test suite, in parallel where pytest-xdist is there, without the modules whose
    packages this machine lacks (no network to install them)."""
    xdist = subprocess.run([PY, "-c", "import xdist"], capture_output=True).returncode == 0
    missing = [m for m in ("fastapi", "seqeval") if subprocess.run([PY, "-c", f"import {m}"],
                                                                  capture_output=True).returncode]
    ignore = ["--ignore=tests/test_serve.py"] if "fastapi" in missing else []
    check.run("test suite on CUDA" + (f" (absent here: {', '.join(missing)})" if missing else ""),
              [PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", *ignore,
               *(["-n", "8"] if xdist else [])], 240, summary=last_line_with("passed"))


def distributed_and_speed(check: Check, gpus: int, out: Path) -> None:
    # 3. two ranks over NCCL
    if gpus >= 2:
        cfg = out / "lm-fp32.yaml"
        check.run("torchrun 2 ranks (NCCL), LM", [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                                                  "rnnkit", "train", str(cfg), "--set",
                                                  f"run_dir={out / 'runs' / 'ddp'}"], 120)
    else:
        check.rows.append(("torchrun 2 ranks (NCCL)", "skipped", 0.0, f"{gpus} GPU on this machine"))

    # 4. throughput on the GPU
    check.run("LM training throughput vs raw PyTorch loop", [PY, "bench/lm_throughput.py", "--device", "cuda"], 120,
              summary=last_line_with("ratio"))
    check.run("translation training and beam search vs hand-written", [PY, "bench/translate.py"], 150,
              summary=last_line_with("ratio"))
    check.run("scan cells vs fused LSTM (training, h512, T 1024)",
              [PY, "bench/cells.py", "--hidden", "512", "--lengths", "1024", "--precision", "fp32", "bf16", "--cells",
               "lstm", "gru", "mingru", "minlstm", "rglru", "--repeats", "2", "--step-tokens", "200"], 120,
              summary=last_line_with("goal mingru"))


def order(row: tuple) -> tuple:
    """Rows by stage: the suite, the tasks (in the order written), then the rest as run."""
    tasks = ["lm", "translation", "tagging", "classification", "forecast", "copy"]
    first = row[0].split()[0]
    if row[0].startswith("test suite"):
        return (0, 0)
    if first in tasks:
        return (1, tasks.index(first))
    return (2, 0)


def report(check: Check, device: str, out: Path) -> int:
    table = [f"# rnnkit GPU check: {device}", "", "| check | status | seconds | detail |", "| --- | --- | --- | --- |"]
    table += [f"| {n} | {s} | {t:.1f} | {d.replace('|', '/')} |" for n, s, t, d in
              sorted(check.rows, key=lambda r: (order(r), check.rows.index(r)))]
    (out / "gpu_check.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    failed = [r for r in check.rows if r[1] not in ("ok", "skipped")]
    print(f"\n{len(check.rows) - len(failed)} of {len(check.rows)} rows ok or skipped; logs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
