"""The newer cells on real work, each cell under the same time budget and thread count as the
LSTM beside it in the same run:

- ``adding``: the memory lab's adding problem at T = 1,000 (configs/adding.yaml otherwise:
  one layer of 128, batch 64, Adam 0.002): test MSE of best.pt beside the baseline of
  always answering 1.0 (0.167); solved means 0.01 or less.
- ``copy``: the memory lab's copy task at the shipped delay (configs/copy.yaml: T = 100,
  10 symbols of 8, one layer of 128): test accuracy of best.pt after the delay beside
  chance (0.125).
- ``wikitext2``: configs/lm_wikitext2.yaml (the shipped 2x400 LSTM recipe: AWD-LSTM
  regularisers, tied adaptive softmax) and the newer cells in residual, layer-normalised
  stacks sized to about its recurrent parameter count (``WIKITEXT2``; DropConnect has no
  recurrent matrix to act on in them, so ``weight_drop`` is 0): test perplexity of best.pt,
  one stream, without and with the recipe's cache (2,000 positions, theta 2.0, lambda 0.25).

Runs go ``--jobs`` at a time, each with ``--threads`` threads, so that the budget each gets
is the same; a finished run in ``--out`` is reused.

    python bench/cells_tasks.py adding [--minutes 15] [--length 1000] [--cells lstm mingru minlstm rglru]
                                       [--chrono 1000]
    python bench/cells_tasks.py copy [--minutes 15] [--length 100] [--cells ...]
    python bench/cells_tasks.py wikitext2 [--minutes 15] [--cells lstm mingru minlstm rglru]
                                          (also gru, slstm, mlstm, mlstm_block, slstm_block,
                                          mlstm_block_fresh: data.carry_state false)
                                          [--decay-by budget]: the recipe's cosine ends with the budget
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WT2 = ROOT.parent / "shared" / "data" / "wikitext-2"
WIKITEXT2 = {   # overrides of configs/lm_wikitext2.yaml per cell: about its 2.57M recurrent parameters
    "lstm": [],
    "gru": [],
    "mingru": ["model.cell=mingru", "model.hidden_size=640", "model.num_layers=3", "model.residual=true",
               "model.layer_norm=true", "model.weight_drop=0"],
    "minlstm": ["model.cell=minlstm", "model.hidden_size=528", "model.num_layers=3", "model.residual=true",
                "model.layer_norm=true", "model.weight_drop=0"],
    "rglru": ["model.cell=rglru", "model.hidden_size=528", "model.num_layers=3", "model.residual=true",
              "model.layer_norm=true", "model.weight_drop=0"],
    "slstm": ["model.cell=slstm", "model.hidden_size=416", "model.num_layers=3", "model.residual=true",
              "model.layer_norm=true", "model.weight_drop=0"],
    "mlstm": ["model.cell=mlstm", "model.hidden_size=464", "model.num_layers=3", "model.residual=true",
              "model.layer_norm=true", "model.weight_drop=0"],
    # xLSTM's blocks (block: true) in the papers' pre-norm residual backbone
    "mlstm_block": ["model.cell=mlstm", "model.block=true", "model.hidden_size=368", "model.num_layers=3",
                    "model.residual=true", "model.layer_norm=true", "model.weight_drop=0"],
    "mlstm_block_fresh": ["model.cell=mlstm", "model.block=true", "model.hidden_size=368", "model.num_layers=3",
                          "model.residual=true", "model.layer_norm=true", "model.weight_drop=0",
                          "data.carry_state=false"],     # every training window from a zero state
    "slstm_block": ["model.cell=slstm", "model.block=true", "model.hidden_size=304", "model.num_layers=3",
                    "model.residual=true", "model.layer_norm=true", "model.weight_drop=0"],
}


def rnnkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rnnkit", *args], capture_output=True, text=True, cwd=ROOT)


def recurrent_parameters(checkpoint: Path) -> int:
    import rnnkit as api

    model = api.load(checkpoint, device="cpu").task.model
    return sum(p.numel() for p in model.rnn.parameters())


def train(config: str, run: Path, overrides: list[str], minutes: float, threads: int,
          decay_by: str = "steps") -> float:
    """Train (or reuse a finished run); the seconds it trained."""
    done = run / "bench_done"
    if not done.exists():
        res = rnnkit("train", config, "--set", f"run_dir={run}", "--set", f"train.max_time={minutes * 60}",
                     "--set", "train.max_steps=1000000", "--set", f"train.num_threads={threads}",
                     "--set", f"train.decay_by={decay_by}",
                     *[x for o in overrides for x in ("--set", o)], *(["--resume"] if (run / "last.pt").exists() else []))
        if res.returncode != 0:
            raise RuntimeError(f"{run.name}: {res.stderr.strip().splitlines()[-1:]}")
        done.write_text("")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max((r.get("elapsed", 0.0) for r in records), default=0.0)


def chrono(args: argparse.Namespace, cell: str) -> tuple[str, list[str]]:
    """The run's name in the table (``cell`` or ``cell chronoT``) and its overrides for ``--chrono``."""
    from rnnkit.config.core import CHRONO_CELLS

    if args.chrono and cell in CHRONO_CELLS:
        return f"{cell} chrono{args.chrono}", [f"model.chrono_init={args.chrono}"]
    return cell, []


def adding(args: argparse.Namespace, cell: str) -> dict:
    name, extra = chrono(args, cell)
    run = args.out / f"adding{args.length}_{name.replace(' ', '_')}"
    seconds = train("configs/adding.yaml", run, [f"model.cell={cell}", f"data.length={args.length}",
                                                 "train.gradient_flow_every=null", *extra], args.minutes, args.threads)
    res = rnnkit("eval", str(run / "best.pt"), "--json")
    result = json.loads(res.stdout)
    steps = max(json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines() if line)
    return {"cell": name, "test_mse": result.get("mse"), "baseline": result.get("baseline_mse"),
            "steps": steps, "seconds": seconds, "result": result}


def copy(args: argparse.Namespace, cell: str) -> dict:
    name, extra = chrono(args, cell)
    run = args.out / f"copy{args.length}_{name.replace(' ', '_')}"
    seconds = train("configs/copy.yaml", run, [f"model.cell={cell}", f"data.length={args.length}",
                                               "train.gradient_flow_every=null", *extra], args.minutes, args.threads)
    result = json.loads(rnnkit("eval", str(run / "best.pt"), "--json").stdout)
    steps = max(json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines() if line)
    return {"cell": name, "accuracy": result.get("accuracy"), "steps": steps, "seconds": seconds, "result": result}


def wikitext2(args: argparse.Namespace, cell: str) -> dict:
    run = args.out / f"wikitext2_{cell}{'_budget' if args.decay_by == 'budget' else ''}"
    seconds = train("configs/lm_wikitext2.yaml", run, WIKITEXT2.get(cell, [f"model.cell={cell}"]),
                    args.minutes, args.threads, args.decay_by)
    test = str(WT2 / "test.txt")
    plain = json.loads(rnnkit("eval", str(run / "best.pt"), "--data", test, "--streams", "1", "--json").stdout)
    cached = json.loads(rnnkit("eval", str(run / "best.pt"), "--data", test, "--streams", "1", "--cache", "2000",
                               "--cache-theta", "2.0", "--cache-lambda", "0.25", "--json").stdout)
    steps = max(json.loads(line).get("step", 0) for line in (run / "metrics.jsonl").read_text().splitlines() if line)
    return {"cell": cell, "test_ppl": plain.get("ppl"), "test_ppl_cache": cached.get("cache_ppl", cached.get("ppl")),
            "parameters": recurrent_parameters(run / "best.pt"), "steps": steps, "seconds": seconds,
            "plain": plain, "cached": cached}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["adding", "copy", "wikitext2"])
    ap.add_argument("--cells", nargs="+", default=["lstm", "mingru", "minlstm", "rglru"])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--length", type=int, help="adding: T (default 1,000); copy: the delay (default 100)")
    ap.add_argument("--chrono", type=int, default=0, help="adding, copy: minGRU's and minLSTM's chrono_init (0: off)")
    ap.add_argument("--decay-by", choices=["steps", "budget"], default="steps",
                    help="wikitext2: budget ends the recipe's cosine at --minutes (train.decay_by); steps, "
                         "with max_steps lifted out of the way, leaves the rate near its peak")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cells_tasks")
    args = ap.parse_args()
    if args.length is None:
        args.length = 1000 if args.what == "adding" else 100
    if args.what == "wikitext2" and not WT2.exists():
        print(f"skipped: {WT2} is absent (the shared corpora are needed)")
        return 0
    import torch

    from bench.machine import describe

    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    started = time.time()
    job = {"adding": adding, "copy": copy, "wikitext2": wikitext2}[args.what]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: job(args, c), args.cells))
    print(describe(torch.device("cpu")))
    print(f"{args.what}: {args.minutes:g} minutes each, {args.threads} thread(s), {args.jobs} at a time "
          f"({(time.time() - started) / 60:.0f} minutes in all)")
    if args.what == "adding":
        print(f"{'cell':<18} {'test MSE':>9} {'baseline':>9} {'solved':>7} {'steps':>7}")
        for r in rows:
            print(f"{r['cell']:<18} {r['test_mse']:>9.4f} {r['baseline']:>9.4f} "
                  f"{'yes' if r['test_mse'] <= 0.01 else 'no':>7} {r['steps']:>7}")
    elif args.what == "copy":
        print(f"{'cell':<18} {'test accuracy':>13} {'chance':>7} {'steps':>7}")
        for r in rows:
            print(f"{r['cell']:<18} {r['accuracy']:>13.3f} {0.125:>7.3f} {r['steps']:>7}")
    else:
        print(f"{'cell':<8} {'recurrent params':>16} {'test ppl':>9} {'with cache':>11} {'steps':>7}")
        for r in rows:
            print(f"{r['cell']:<8} {r['parameters']:>16,} {r['test_ppl']:>9.1f} {r['test_ppl_cache']:>11.1f} "
                  f"{r['steps']:>7}")
    saved = args.out / f"{args.what}.json"     # earlier cells' rows kept, this run's replacing theirs
    ran = {r["cell"] for r in rows}
    earlier = [r for r in json.loads(saved.read_text()) if r["cell"] not in ran] if saved.exists() else []
    saved.write_text(json.dumps(earlier + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
