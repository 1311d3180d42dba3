"""WikiText-2 word-level language modeling in a fixed time budget: configs/lm_wikitext2.yaml
(2-layer LSTM with the AWD-LSTM regularisers, adaptive softmax) against the same model and
budget without the regularisers, then the continuous cache on the regularised model.

For each run: ``rnnkit train`` for ``--minutes`` (a finished run in the output folder is
reused, an unfinished one resumed), the validation curve (perplexity against minutes), and
best.pt's perplexity on valid and test (the literature's protocol: the files as continuous
streams, ``<eos>`` counted). The cache's theta and lambda are chosen on valid only, then
applied to test. Last, training tokens/s with a full softmax against the adaptive one
(the same model otherwise, short runs, alternated).

    python bench/wikitext2.py [--minutes 60] [--runs regularised plain] [--out bench/out/wikitext2]

Needs ../shared/data/wikitext-2. Writes a table, results.json, and docs/images/wikitext2_curve.png.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
CONFIG = ROOT / "configs" / "lm_wikitext2.yaml"
# the same model and schedule with every regulariser off
PLAIN = ["model.dropout=0", "model.input_dropout=0", "model.layer_dropout=0", "model.locked_dropout=false",
         "model.embedding_dropout=0", "model.weight_drop=0", "train.ar=0", "train.tar=0", "data.variable_bptt=false"]
RUNS = {"regularised": [], "plain": PLAIN}
QUICK = ["model.embedding_dim=16", "model.hidden_size=16", "model.num_layers=1", "train.max_steps=2",
         "train.eval_every=2", "train.warmup_steps=0", "train.lr_schedule=constant", "train.decay_by=steps",
         "train.batch_size=4", "data.bptt=10"]   # --quick: checks that it runs
THETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
LAMBDAS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3)


def rnnkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "rnnkit", *args]
    print("$ rnnkit " + " ".join(args), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


EXTRA: list[str] = []     # --quick's overrides, given to every run
TEXTS = [DATA]            # the folder the runs read (--quick: slices of the corpus)


def data_overrides() -> list[str]:
    return [f"data.{split}={TEXTS[0] / f'{split}.txt'}" for split in ("train", "valid", "test")] + EXTRA


def train(name: str, overrides: list[str], minutes: float, out: Path) -> Path:
    run = out / name
    sets = [f"run_dir={run}", f"train.max_time={minutes * 60}", *data_overrides(), *overrides]
    last = run / "last.pt"
    resume = []
    if last.exists():
        from rnnkit.training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(last)
        progress = ckpt["progress"]
        if progress["elapsed"] >= minutes * 60 or progress["step"] >= ckpt["config"]["train"]["max_steps"]:
            print(f"{name}: reusing the finished run in {run}")
            return run
        resume = ["--resume"]
    rnnkit("train", str(CONFIG), *resume, *[a for s in sets for a in ("--set", s)])
    return run


def curve(run: Path) -> list[tuple[float, float]]:
    """(minutes, validation perplexity) of every evaluation."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    clock = {r["step"]: r["elapsed"] for r in rows if r["kind"] == "train"}
    return [(clock.get(r["step"], float("nan")) / 60, r["valid_ppl"]) for r in rows if r["kind"] == "eval"]


def score(run: Path, streams: int, cache: int, grid: tuple) -> dict:
    """best.pt on valid and test (one pass each: perplexity, and the states the cache reads);
    the cache's theta and lambda chosen on valid (over ``grid``: thetas, lambdas), then
    applied to test."""
    import numpy as np

    from rnnkit.data.vocab import read_text
    from rnnkit.runs import load_task
    from rnnkit.decoding.lm_loop import cache_mix_loss, cache_probs, stream_states
    from rnnkit.tasks.language_model import batchify

    task = load_task(run / "best.pt", "cpu")
    task.model.eval()
    out, states = {}, {}
    for split in ("valid", "test"):
        ids = np.asarray(task.encode(read_text(str(TEXTS[0] / f"{split}.txt"))), np.int64)
        stream = np.ascontiguousarray(batchify(ids, streams))
        start = time.perf_counter()
        states[split] = stream_states(task, stream, task.cfg.data.bptt)
        p_model = states[split][1]
        out[f"{split}_ppl"] = math.exp(-np.log(p_model).mean())
        out[f"{split}_tokens"], out[f"{split}_seconds"] = p_model.size, time.perf_counter() - start
    if not cache:
        return out
    best = None
    hidden, p_model, words = states["valid"]
    thetas, lambdas = grid
    for theta in thetas:
        p_cache, seen = cache_probs(hidden, words, cache, theta)
        for lam in lambdas:
            ppl = math.exp(cache_mix_loss(p_model, p_cache, seen, lam))
            if best is None or ppl < best[0]:
                best = (ppl, theta, lam)
    out["cache_valid_ppl"], out["cache_theta"], out["cache_lambda"] = best
    hidden, p_model, words = states["test"]
    p_cache, seen = cache_probs(hidden, words, cache, best[1])
    out["cache_test_ppl"], out["cache"] = math.exp(cache_mix_loss(p_model, p_cache, seen, best[2])), cache
    return out


def softmax_speed(out: Path, steps: int, rounds: int) -> dict[str, float]:
    """Training tokens/s of the regularised model with a full softmax and with the adaptive one."""
    speeds: dict[str, list[float]] = {"softmax": [], "adaptive": []}
    for r in range(rounds):
        for output in ("softmax", "adaptive"):
            run = out / f"speed_{output}_{r}"
            if run.exists():
                shutil.rmtree(run)
            rnnkit("train", str(CONFIG), "--set", f"run_dir={run}", "--set", f"model.output={output}",
                   "--set", f"train.max_steps={steps}", "--set", f"train.log_every={steps // 2}",
                   "--set", f"train.eval_every={steps}", "--set", "train.warmup_steps=0",
                   "--set", "train.lr_schedule=constant", "--set", "train.decay_by=steps",
                   *[a for s in data_overrides() for a in ("--set", s)])
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            speeds[output].append([x for x in rows if x["kind"] == "train"][-1]["tokens_per_s"])   # second half
    return {k: statistics.median(v) for k, v in speeds.items()}


def plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        ax.plot([m for m, _ in points], [p for _, p in points], marker=".", label=name)
    ax.set_yscale("log")
    ax.set_ylim(top=min(1000, max(p for pts in curves.values() for _, p in pts)))
    ax.axhline(100, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("training minutes (2 CPU cores)")
    ax.set_ylabel("WikiText-2 validation perplexity")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="training time of each run")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "wikitext2")
    ap.add_argument("--streams", type=int, default=1, help="parallel streams when scoring (1: the literature's)")
    ap.add_argument("--cache", type=int, default=2000, help="cache size (positions)")
    ap.add_argument("--speed-steps", type=int, default=40, help="steps of each softmax speed run (0: skip)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 steps, a small cache: checks that it runs")
    args = ap.parse_args()
    figure = ROOT / "docs" / "images" / "wikitext2_curve.png"
    if args.quick:
        import tempfile

        EXTRA.extend(QUICK)
        args.out, args.streams, args.cache, args.speed_steps = Path(tempfile.mkdtemp()), 16, 50, 2
        args.runs = ["regularised"]
        figure = args.out / "curve.png"
    if not (DATA / "train.txt").is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    if args.quick:      # the first lines of each split: every step runs, on a small vocabulary
        TEXTS[0] = args.out / "texts"
        TEXTS[0].mkdir()
        for split, lines in (("train", 3000), ("valid", 300), ("test", 300)):
            with (DATA / f"{split}.txt").open(encoding="utf-8") as fh:
                (TEXTS[0] / f"{split}.txt").write_text("".join(fh.readline() for _ in range(lines)), encoding="utf-8")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "minutes": args.minutes, "runs": {}}
    path = args.out / "results.json"
    if path.exists():     # earlier runs' figures stay unless measured again
        earlier = json.loads(path.read_text())
        results["runs"] = earlier.get("runs", {})
        if "tokens_per_s" in earlier:
            results["tokens_per_s"] = earlier["tokens_per_s"]
    curves = {}
    grid = (THETAS[:2], LAMBDAS[:2]) if args.quick else (THETAS, LAMBDAS)
    for name in args.runs:
        run = train(name, RUNS[name], args.minutes, args.out)
        curves[name] = curve(run)
        scored = score(run, args.streams, args.cache if name == "regularised" else 0, grid)
        from rnnkit.training.checkpoint import load_checkpoint

        p = load_checkpoint(run / "last.pt")["progress"]
        results["runs"][name] = {**scored, "minutes": p["elapsed"] / 60, "steps": p["step"],
                                 "best_step": p["best_step"], "curve": curves[name]}
        path.write_text(json.dumps(results, indent=1))
    if args.speed_steps:
        results["tokens_per_s"] = softmax_speed(args.out, args.speed_steps, 1 if args.quick else 2)
        path.write_text(json.dumps(results, indent=1))
    if curves:
        plot({n: r["curve"] for n, r in results["runs"].items()}, figure)

    print(f"\nWikiText-2, {args.minutes:g} minutes of training each; CPU {results['machine']}, "
          f"{results['threads']} threads, torch {results['torch']}; scored with {args.streams} stream(s)")
    print("| run | minutes | steps | best step | valid ppl | test ppl | test ppl, cache |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["runs"].items():
        cache = (f"{r['cache_test_ppl']:.1f} (N {r['cache']}, theta {r['cache_theta']}, lambda {r['cache_lambda']}; "
                 f"{100 * (1 - r['cache_test_ppl'] / r['test_ppl']):.1f}% lower)") if "cache_test_ppl" in r else "-"
        print(f"| {name} | {r['minutes']:.1f} | {r['steps']} | {r['best_step']} | {r['valid_ppl']:.1f} | "
              f"{r['test_ppl']:.1f} | {cache} |")
    if "tokens_per_s" in results:
        s = results["tokens_per_s"]
        print(f"\ntraining tokens/s: full softmax {s['softmax']:.0f}, adaptive {s['adaptive']:.0f} "
              f"({s['adaptive'] / s['softmax']:.2f}x)")
    for name, r in results["runs"].items():
        print(f"\ncurve, {name}: " + ", ".join(f"{m:.0f} min {p:.0f}" for m, p in r["curve"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
