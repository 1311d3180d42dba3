"""Training memory against the variety of sentence lengths.

Trains the shared translation model (configs/translate_attention.yaml) with ``rnnkit train``
on synthetic parallel text, once on sentences whose lengths vary uniformly over 1..100
(each batch, built by length bucketing, takes whatever length its sentences have: a hundred
different shapes) and once on sentences that all have one fixed length (one shape), and
compares the two processes' peak resident memory. The fixed length is the variable run's
longest (100) by default, so that both runs hold the same largest batch and what differs is
the variety of shapes alone; ``--fixed-length 50`` compares at the same mean instead.

Each run's resident memory is also sampled every 0.25 s, so the table shows when the peak
was reached: early and flat, or growing with the steps. ``--env NAME=VALUE`` adds variants of
the variable-length run with an environment variable set (for finding where memory goes, e.g.
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=8``, or ``MALLOC_ARENA_MAX=1``, which turns off rnnkit's own
malloc settings).

    python bench/memory.py [--steps 1000] [--batch-size 16] [--fixed-length 100] [--env K=V ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402

OUT = ROOT / "bench" / "out" / "memory"
WORDS = 2000


def set_out(path: Path) -> None:
    global OUT
    OUT = path


def corpus(folder: Path, n: int, lengths: list[int], seed: int) -> tuple[Path, Path]:
    """``n`` sentence pairs of random words, each pair's sides as long as ``random.choice(lengths)``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    src, tgt = folder / "train.src", folder / "train.tgt"
    with src.open("w") as fs, tgt.open("w") as ft:
        for _ in range(n):
            k = rng.choice(lengths)
            fs.write(" ".join(f"s{rng.randrange(WORDS)}" for _ in range(k)) + "\n")
            ft.write(" ".join(f"t{rng.randrange(WORDS)}" for _ in range(k)) + "\n")
    return src, tgt


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def train(name: str, data: tuple[Path, Path], valid: tuple[Path, Path], steps: int, batch: int,
          env: dict[str, str], precision: str = "fp32") -> dict:
    run = OUT / "runs" / name
    cmd = [sys.executable, "-m", "rnnkit", "train", str(ROOT / "configs" / "translate_attention.yaml"),
           "--set", f"run_dir={run}", "--set", f"data.train_src={data[0]}", "--set", f"data.train_tgt={data[1]}",
           "--set", f"data.valid_src={valid[0]}", "--set", f"data.valid_tgt={valid[1]}",
           "--set", "data.min_freq=1", "--set", "data.cache=false", "--set", f"train.batch_size={batch}",
           "--set", f"train.max_steps={steps}", "--set", f"train.eval_every={steps}", "--set", "train.max_time=null",
           "--set", "train.metric=valid_loss", "--set", "train.metric_mode=min", "--set", "train.log_every=50",
           "--set", "train.num_threads=2", "--set", f"train.precision={precision}"]
    if run.exists():
        import shutil
        shutil.rmtree(run)
    log = OUT / f"{name}.log"
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                samples.append((time.perf_counter() - start, rss_mb(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{name}: rnnkit train failed (status {status}); see {log}")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_records = [r for r in records if "tokens_per_s" in r]
    peak = usage.ru_maxrss / 1024
    first_at = next((t for t, r in samples if r >= 0.97 * peak), wall)
    quarter = [r for t, r in samples if t <= wall / 4]
    return {"name": name, "env": env, "peak_mb": peak, "wall_s": wall,
            "tokens_per_s": train_records[-1]["tokens_per_s"] if train_records else None,
            "rss_first_quarter_mb": max(quarter) if quarter else None,
            "within_3pct_of_peak_at_s": first_at, "samples": samples[::8]}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=100)
    ap.add_argument("--fixed-length", type=int, default=None, help="default: --max-length")
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE: a variant of the variable-length run")
    ap.add_argument("--only-variants", action="store_true", help="leave the two main runs out")
    ap.add_argument("--only-variable", action="store_true", help="leave the fixed-length run out")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="5 steps on 200 short pairs: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.pairs, args.max_length = 5, 200, 12
        args.out = Path(tempfile.mkdtemp())
    set_out(args.out)
    fixed = args.fixed_length or args.max_length
    OUT.mkdir(parents=True, exist_ok=True)
    variable = corpus(OUT / "variable", args.pairs, list(range(1, args.max_length + 1)), 1)
    same = corpus(OUT / f"fixed{fixed}", args.pairs, [fixed], 2)
    valid = corpus(OUT / "valid", 64, list(range(1, args.max_length + 1)), 3)
    runs = []
    if not args.only_variants:
        runs.append(train("variable", variable, valid, args.steps, args.batch_size, {}, args.precision))
    if not args.only_variants and not args.only_variable:
        runs.append(train(f"fixed{fixed}", same, valid, args.steps, args.batch_size, {}, args.precision))
    for spec in args.env:
        key, _, value = spec.partition("=")
        runs.append(train(f"variable_{key}_{value}", variable, valid, args.steps, args.batch_size, {key: value},
                          args.precision))
    (OUT / "results.json").write_text(json.dumps(runs, indent=1))
    import torch

    print(f"\nTraining memory, shared translation model, {args.precision}, {args.steps} steps of "
          f"{args.batch_size} sentences, "
          f"CPU {cpu_description()}, torch {torch.__version__}, 2 threads")
    print("| run | lengths | peak RSS | max RSS in the first quarter | peak reached (s of run) | target tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in runs:
        lengths = f"fixed {fixed}" if r["name"].startswith("fixed") else f"uniform 1-{args.max_length}"
        env = ", ".join(f"{k}={v}" for k, v in r["env"].items())
        print(f"| {r['name']}{' (' + env + ')' if env else ''} | {lengths} | {r['peak_mb']:.0f} MB | "
              f"{_mb(r['rss_first_quarter_mb'])} | {r['within_3pct_of_peak_at_s']:.0f} of {r['wall_s']:.0f} | "
              f"{'-' if r['tokens_per_s'] is None else format(r['tokens_per_s'], '.0f')} |")
    if len(runs) > 1 and runs[1]["name"].startswith("fixed"):
        ratio = runs[0]["peak_mb"] / runs[1]["peak_mb"]
        print(f"\nvariable / fixed peak RSS: {ratio:.3f} (goal: within 15%, 0.87-1.15)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
