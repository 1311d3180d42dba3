"""Learning while it runs: dynamic evaluation of language models and online forecasting.

1. ``--dynamic``: a WikiText-2 word LM (``--lm CKPT``, or configs/lm_wikitext2.yaml trained
   ``--lm-minutes`` here): the dynamic-evaluation settings chosen on the first
   ``--valid-tokens`` tokens of valid, then test perplexity static, dynamic, with the cache
   and with both, and the time each took. With ``--char``, the same for a tiny-shakespeare
   character LM (configs/char_lm.yaml trained ``--char-minutes``): bits per character.
2. ``--online``: ETTh1 on FSNet's protocol (configs/forecast_online_etth1.yaml: rows
   0-2,880 train, 2,880-3,600 validate, 3,600-14,400 online, look-back 60), horizons 1, 24
   and 48: the online settings chosen on the validation rows, then the cumulative MSE and
   MAE of the frozen model, the model updated online, and updated with replay, under the
   leak-free and the published protocols; the plot of cumulative MSE over the online phase.

    python bench/online.py --online [--horizons 1 24 48]
    python bench/online.py --dynamic [--lm runs/lm_wikitext2/best.pt] [--char]
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
ETT = SHARED / "ett" / "ETTh1.csv"
WT2 = SHARED / "wikitext-2"
OUT = ROOT / "bench" / "out" / "online"
# FSNet's table (ETTh2, cumulative MSE): how far below OnlineTCN FSNet gets, per horizon
FSNET_OVER_TCN = {1: 0.466 / 0.502, 24: 0.687 / 0.830, 48: 0.846 / 1.183}


def train(config: str, run_dir: Path, *overrides: str) -> Path:
    if not (run_dir / "best.pt").is_file():
        sets = [x for o in (f"run_dir={run_dir}", *overrides) for x in ("--set", o)]
        res = subprocess.run([sys.executable, "-m", "rnnkit", "train", config, *sets], cwd=ROOT,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"training {config} failed:\n{res.stderr[-2000:]}")
    return run_dir / "best.pt"


# ---------------------------------------------------------------------- online forecasting
def online(horizons: list[int], seconds: int, end: int = 14400, quick: bool = False) -> list[str]:
    import numpy as np

    import rnnkit
    from rnnkit.tasks.online import Online

    lines, curves = [], {}
    grid = [Online(optimizer=o, lr=lr) for o, lr in itertools.chain(
        (("sgd", lr) for lr in (0.001, 0.003, 0.01, 0.03)), (("adam", lr) for lr in (0.0001, 0.0003, 0.001)))]
    if quick:
        grid = grid[:2]
    for h in horizons:
        ckpt = train("configs/forecast_online_etth1.yaml", OUT / f"etth1_h{h}{'_quick' if quick else ''}",
                     f"data.path={ETT}", f"data.horizon={h}", f"train.max_time={seconds}")
        chosen = {}
        for protocol in ("leak-free", "published"):
            scored = []
            for g in grid:            # on the validation rows only
                m = rnnkit.load(ckpt)
                r = m.online(ETT, 2880, 3000 if quick else 3600, Online(protocol, g.optimizer, g.lr))
                scored.append((r["online_mse"], g))
            best = min(scored, key=lambda s: s[0])[1]
            m = rnnkit.load(ckpt)
            with_replay = Online(protocol, best.optimizer, best.lr, replay=256, replay_batch=8)
            replayed = m.online(ETT, 2880, 3000 if quick else 3600, with_replay)["online_mse"]
            chosen[protocol] = (best, with_replay)
            print(f"H={h} {protocol}: chose {best.optimizer} lr {best.lr} on validation "
                  f"(valid MSE {min(s[0] for s in scored):.4f}; with replay {replayed:.4f})", file=sys.stderr, flush=True)
        for protocol in ("leak-free", "published"):
            best, with_replay = chosen[protocol]
            started = time.perf_counter()
            r = rnnkit.load(ckpt).online(ETT, 3600, end, best)
            rr = rnnkit.load(ckpt).online(ETT, 3600, end, with_replay)
            seconds_taken = time.perf_counter() - started
            ratio, ratio_replay = r["online_mse"] / r["frozen_mse"], rr["online_mse"] / rr["frozen_mse"]
            goal = 0.8 if protocol == "leak-free" else FSNET_OVER_TCN[h]
            met = "met" if min(ratio, ratio_replay) <= goal else "not met"
            lines.append(f"| {h} | {protocol} | {r['frozen_mse']:.3f} / {r['frozen_mae']:.3f} | "
                         f"{r['online_mse']:.3f} / {r['online_mae']:.3f} ({ratio:.3f}) | "
                         f"{rr['online_mse']:.3f} / {rr['online_mae']:.3f} ({ratio_replay:.3f}) | "
                         f"{best.optimizer} {best.lr} | <= {goal:.3f}: {met} | {seconds_taken:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            if protocol == "leak-free" and h == 24:
                curves = {"frozen": r["frozen_curve"], "online": r["online_curve"], "online + replay": rr["online_curve"]}
    if curves and not quick:
        path = ROOT / "docs" / "images" / "online_etth1.png"
        x = np.arange(len(next(iter(curves.values())))) + 3600
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for name, curve in curves.items():
            ax.plot(x, curve, label=name)
        ax.set(title="ETTh1, horizon 24, leak-free: cumulative MSE over the online phase", xlabel="origin row",
               ylabel="cumulative MSE (standardised)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        lines.append(f"plot: {path.relative_to(ROOT)}")
    header = ["| H | protocol | frozen MSE / MAE | online (vs frozen) | online + replay (vs frozen) | chosen on "
              "validation | goal (MSE vs frozen) | seconds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return header + lines


# ---------------------------------------------------------------------- dynamic evaluation
def chosen_on_valid(model, valid: str, streams: int, grid: list[tuple], metric: str) -> tuple:
    """The settings (rule, rate, decay, segment, eps) of ``grid`` with the lowest dynamic
    ``metric`` on ``valid``; an entry without eps takes the paper's 0.001."""
    from rnnkit.tasks.dynamic import Dynamic

    found = []
    for entry in grid:
        rule, lr, decay, n, eps = (*entry, 0.001)[:5]
        r = model.score(valid, streams=streams, dynamic=Dynamic(rule, lr, decay, eps=eps, segment=n))
        found.append((r[f"dynamic_{metric}"], (rule, lr, decay, n, eps)))
        print(f"valid: {rule} lr {lr} decay {decay} n {n} eps {eps}: {r[metric]:.3f} -> "
              f"{r[f'dynamic_{metric}']:.3f} {metric}", file=sys.stderr, flush=True)
    return min(found)[1]


def dynamic(lm: Path | None, minutes: float, valid_tokens: int, streams: int, char: bool, char_minutes: float) -> list[str]:
    import rnnkit
    from rnnkit.data.vocab import read_text
    from rnnkit.tasks.dynamic import Dynamic

    lines = []
    if lm is None:
        lm = train("configs/lm_wikitext2.yaml", OUT / f"wt2_{minutes:g}min", f"train.max_time={minutes * 60}")
    valid = " ".join(read_text(str(WT2 / "valid.txt")).split(" ")[:valid_tokens])
    test = read_text(str(WT2 / "test.txt"))
    m = rnnkit.load(lm)
    grid = [("rms", lr, decay, 5) for lr in (0.001, 0.0015, 0.002, 0.003, 0.004) for decay in (0.0, 0.005)]
    grid += [("rms", 0.002, 0.02, 5), ("rms", 0.008, 0.02, 5), ("rms", 0.0005, 0.0, 5, 0.0001),
             ("rms", 0.001, 0.0, 5, 0.0003), ("rms", 0.004, 0.0, 5, 0.003), ("sgd", 0.1, 0.02, 5), ("sgd", 0.3, 0.0, 5)]
    rule, lr, decay, _, eps = chosen_on_valid(m, valid, streams, grid, "ppl")
    r = m.score(test, streams=streams, cache=2000, cache_theta=2.0, cache_lambda=0.25,
                dynamic=Dynamic(rule, lr, decay, eps=eps))
    lines.append(f"| WikiText-2 test, word LM ({lm}) | {r['ppl']:.1f} | {r['dynamic_ppl']:.1f} | {r['cache_ppl']:.1f} | "
                 f"{r['dynamic_cache_ppl']:.1f} | {rule}, eta {lr}, lambda {decay}, eps {eps}, n 5, {streams} streams | "
                 f"{r['static_seconds']:.0f} s / {r['dynamic_seconds']:.0f} s |")
    if char:
        ckpt = train("configs/char_lm.yaml", OUT / f"shakespeare_{char_minutes:g}min", f"train.max_time={char_minutes * 60}")
        c = rnnkit.load(ckpt)
        text = read_text(str(SHARED / "tinyshakespeare" / "input.txt"))
        # the corpus README's split: 90% train, 5% valid, 5% test; settings chosen on valid
        valid, test = text[int(len(text) * 0.9):int(len(text) * 0.95)], text[int(len(text) * 0.95):]
        grid = [("rms", 0.0005, 0.02, 5), ("rms", 0.002, 0.02, 5), ("rms", 0.0005, 0.02, 20), ("rms", 0.001, 0.02, 20),
                ("rms", 0.002, 0.02, 20), ("rms", 0.001, 0.005, 20), ("sgd", 0.03, 0.02, 20)]
        rule, lr, decay, n, eps = chosen_on_valid(c, valid, streams, grid, "bpc")
        r = c.score(test, streams=streams, dynamic=Dynamic(rule, lr, decay, eps=eps, segment=n))
        lines.append(f"| tiny shakespeare test (last 5%), char LM | {r['bpc']:.3f} bpc | {r['dynamic_bpc']:.3f} bpc | - | - | "
                     f"{rule}, eta {lr}, lambda {decay}, n {n}, {streams} streams | {r['static_seconds']:.0f} s / "
                     f"{r['dynamic_seconds']:.0f} s |")
    return ["| text, model | static | dynamic | cache | dynamic + cache | settings (chosen on valid) | time static / "
            "dynamic |", "| --- | --- | --- | --- | --- | --- | --- |"] + lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--online", action="store_true")
    ap.add_argument("--horizons", type=int, nargs="+", default=[1, 24, 48])
    ap.add_argument("--forecast-seconds", type=int, default=300)
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--lm", type=Path, default=None)
    ap.add_argument("--lm-minutes", type=float, default=60.0)
    ap.add_argument("--valid-tokens", type=int, default=30_000)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--char", action="store_true")
    ap.add_argument("--char-minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="online only, horizon 24, a few hundred rows: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.online, args.dynamic, args.horizons, args.forecast_seconds = True, False, [24], 10
    from bench.machine import cpu_description

    OUT.mkdir(parents=True, exist_ok=True)
    print(f"CPU {cpu_description()}")
    if args.online:
        if not ETT.is_file():
            print(f"skipped: {ETT} is absent")
        else:
            print("\n".join(online(args.horizons, args.forecast_seconds, 3800 if args.quick else 14400, args.quick)))
    if args.dynamic:
        if not WT2.is_dir():
            print(f"skipped: {WT2} is absent")
        else:
            print("\n".join(dynamic(args.lm, args.lm_minutes, args.valid_tokens, args.streams, args.char,
                                    args.char_minutes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
