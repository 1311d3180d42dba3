"""Data-parallel throughput: the same training (global batch fixed) with 1 and with N processes
under torchrun, tokens per second from metrics.jsonl, and the scaling efficiency
(tokens/s with N) / (N x tokens/s with 1).

On CPU each process gets cores/N threads, so on a 2-core machine this measures the cost of
the all-reduce and the split batches, not a speed-up. On a machine with N GPUs it measures
scaling.

    python bench/distributed.py [--procs 2] [--config configs/char_lm.yaml] [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402


QUICK = ["model.hidden_size=32", "model.embedding_dim=16", "train.batch_size=8", "data.bptt=16"]


def run(procs: int, config: str, steps: int, run_dir: Path, threads: int, extra: list[str] = ()) -> float:
    log_every = max(1, min(10, steps // 4))
    overrides = [f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.eval_every={steps}",
                 f"train.log_every={log_every}", "train.max_time=null", f"train.num_threads={threads}", *extra]
    sets = [x for o in overrides for x in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "-m", "rnnkit", "train", config, *sets]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ})
    if res.returncode != 0:
        raise SystemExit(f"{procs} processes failed: {res.stderr[-1500:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][2:]          # after warm-up
    return sum(r["tokens"] for r in train) / sum(r["tokens"] / r["tokens_per_s"] for r in train)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--config", default="configs/char_lm.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="a small model, 12 steps: checks that it runs")
    args = ap.parse_args()
    extra = QUICK if args.quick else []
    if args.quick:
        args.steps = 12
    import torch

    from rnnkit.config import ConfigError, load_config

    try:
        load_config(ROOT / args.config)
    except ConfigError as err:
        if "file not found" not in str(err):
            raise
        print(f"skipped: {err} (the shared corpora are needed)")
        return 0
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.config, args.steps, Path(tmp) / "one", cores if not gpus else 1, extra)
        many = run(args.procs, args.config, args.steps, Path(tmp) / "many",
                   max(1, cores // args.procs) if not gpus else 1, extra)
    print(describe(torch.device("cuda" if gpus else "cpu")))
    print(f"{args.config}, {args.steps} steps, global batch as configured; "
          f"{'GPUs: ' + str(gpus) if gpus else f'CPU, {cores} cores shared by the processes'}")
    print(f"1 process:  {one:,.0f} tokens/s")
    print(f"{args.procs} processes: {many:,.0f} tokens/s")
    print(f"scaling efficiency ({args.procs} processes): {many / (args.procs * one):.3f}  "
          f"speed ratio {args.procs}/1: {many / one:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
