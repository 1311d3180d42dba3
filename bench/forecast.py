"""ETTh1 long-horizon forecasting against the published tables: for each horizon, rnnkit's
Trainer trains configs/forecast_etth1.yaml for a fixed time, the best checkpoint on validation
is scored on the test rows, and the script prints test MSE / MAE (standardised values, all
seven columns) beside the last-value and seasonal baselines on the same windows and the
figures the papers report for the same protocol.

    python bench/forecast.py [--horizons 96 192 336 720] [--minutes 15] [--set KEY=VALUE ...]

Needs ../shared/data/ett/ETTh1.csv.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402

# ETTh1, multivariate, test MSE / MAE by horizon, as their papers report them
# (Informer and Autoformer as quoted in the Autoformer, DLinear and PatchTST tables).
PUBLISHED = {
    "Informer": {96: (0.865, 0.713), 192: (1.008, 0.792), 336: (1.107, 0.809), 720: (1.181, 0.865)},
    "Autoformer": {96: (0.449, 0.459), 192: (0.500, 0.482), 336: (0.521, 0.496), 720: (0.514, 0.512)},
    "DLinear": {96: (0.375, 0.399), 192: (0.405, 0.416), 336: (0.439, 0.443), 720: (0.472, 0.490)},
    "PatchTST/64": {96: (0.370, 0.400), 192: (0.413, 0.429), 336: (0.422, 0.440), 720: (0.447, 0.468)},
}
DATA = ROOT.parent / "shared" / "data" / "ett" / "ETTh1.csv"


def run_horizon(horizon: int, minutes: float, overrides: list[str], run_dir: Path) -> dict:
    from rnnkit.config import load_config
    from rnnkit.runs import load_task, prepare_trainer

    cfg = load_config(ROOT / "configs" / "forecast_etth1.yaml",
                      [f"run_dir={run_dir}", f"data.path={DATA}", f"data.horizon={horizon}",
                       f"train.max_time={minutes * 60}", *overrides])
    trainer = prepare_trainer(cfg)
    trainer.fit()
    task = load_task(run_dir / "best.pt", cfg.train.device)
    test = task.evaluate_file(str(DATA), cfg.train.eval_batch_size, split="test")
    valid = task.evaluate_file(str(DATA), cfg.train.eval_batch_size, split="valid")
    p = trainer.progress
    return {**test, "valid_mse": valid["mse"], "valid_mae": valid["mae"], "best_step": p.best_step, "steps": p.step, "minutes": p.elapsed / 60,
            "input_length": cfg.data.input_length, "device": task.device}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--horizons", type=int, nargs="+", default=[96, 192, 336, 720])
    ap.add_argument("--minutes", type=float, default=15.0, help="training time per horizon")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="one horizon, a small model, 3 steps: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.horizons = [96]
        args.overrides += ["model.hidden_size=16", "train.max_steps=3", "train.eval_every=3"]
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for h in args.horizons:
            r = run_horizon(h, args.minutes, args.overrides, Path(tmp) / f"h{h}")
            rows.append((h, r))
            print(f"horizon {h}: valid MSE {r['valid_mse']:.4f}, test MSE {r['mse']:.3f} MAE {r['mae']:.3f}",
                  file=sys.stderr, flush=True)
    print(describe(rows[0][1]["device"]))
    print(f"ETTh1 multivariate, input length {rows[0][1]['input_length']}, test rows [11520, 14400), "
          f"standardised MSE / MAE; overrides: {' '.join(args.overrides) or 'none'}")
    names = list(PUBLISHED)
    print(f"{'horizon':>7} {'rnnkit':>13} {'last value':>13} {'seasonal 24':>13} "
          + " ".join(f"{n:>13}" for n in names) + f" {'minutes':>8} {'best/steps':>11} {'MSE/DLinear':>11}")
    for h, r in rows:
        pub = " ".join(f"{PUBLISHED[n][h][0]:.3f}/{PUBLISHED[n][h][1]:.3f}".rjust(13) if h in PUBLISHED[n]
                       else f"{'-':>13}" for n in names)
        ratio = f"{r['mse'] / PUBLISHED['DLinear'][h][0]:.3f}" if h in PUBLISHED["DLinear"] else "-"
        print(f"{h:>7} {r['mse']:>6.3f}/{r['mae']:.3f} {r['last_value_mse']:>6.3f}/{r['last_value_mae']:.3f} "
              f"{r['seasonal_mse']:>6.3f}/{r['seasonal_mae']:.3f} {pub} {r['minutes']:>8.1f} "
              f"{r['best_step']:>5}/{r['steps']:<5} {ratio:>11} {r['valid_mse']:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
