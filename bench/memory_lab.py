"""The memory lab: vanilla RNN, LSTM, GRU and layer-normalised LSTM on the adding and copy
tasks, trained for the same number of steps, with their gradient flow.

For each task setting (adding T=100, adding T=200, copy T=100; configs/adding.yaml and
configs/copy.yaml otherwise) and each cell, rnnkit's Trainer trains a fresh model, then
the script measures the gradient of the loss with respect to every earlier hidden state
on a validation batch. It prints one table (final validation metric beside the baseline,
fitted gradient decay per time step, training seconds) and writes one PNG that overlays
the gradient-flow curves, one panel per task setting.

    python bench/memory_lab.py [--steps 1500] [--png docs/images/memory_lab.png] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402

SETTINGS = [("adding", 100, "configs/adding.yaml"), ("adding", 200, "configs/adding.yaml"),
            ("copy", 100, "configs/copy.yaml")]
CELLS = {"rnn_tanh": ["model.cell=rnn_tanh"], "lstm": ["model.cell=lstm"], "gru": ["model.cell=gru"],
         "lstm + layer norm": ["model.cell=lstm", "model.impl=explicit", "model.layer_norm=true"]}


def train_one(config: str, length: int, cell_overrides: list[str], steps: int, device: str, run_dir: Path):
    from rnnkit.config import load_config
    from rnnkit.runs import prepare_trainer

    cfg = load_config(ROOT / config, [f"run_dir={run_dir}", f"data.length={length}", f"train.max_steps={steps}",
                                      "train.max_time=null", f"train.eval_every={steps}",
                                      "train.gradient_flow_every=null", f"train.device={device}", *cell_overrides])
    trainer = prepare_trainer(cfg)
    trainer.fit()
    return trainer.progress.last_eval, trainer.task.gradient_flow(), trainer.progress.elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "images" / "memory_lab.png")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="3 steps each, no figure kept: checks that it runs")
    args = ap.parse_args()
    settings, extra = SETTINGS, []
    if args.quick:
        args.steps = 3
        args.png = Path(tempfile.mkdtemp()) / "memory_lab.png"
        settings = [("adding", 20, "configs/adding.yaml"), ("copy", 10, "configs/copy.yaml")]
        extra = ["model.hidden_size=16", "data.valid_size=32", "train.batch_size=8"]
    from rnnkit.plots import save_gradient_flow_panels
    from rnnkit.training.interface import resolve_device

    rows, panels = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, length, config in settings:
            setting = f"{task} T={length}"
            panels[setting] = {}
            for cell, overrides in CELLS.items():
                run = Path(tmp) / f"{task}{length}-{cell.replace(' ', '_')}"
                last, flow, seconds = train_one(config, length, [*overrides, *extra], args.steps, args.device, run)
                if task == "adding":
                    shown = f"MSE {last['valid_mse']:.4f} (baseline {last['valid_baseline_mse']:.4f})"
                else:
                    shown = f"accuracy {last['valid_accuracy']:.3f} (baseline {last['valid_baseline_accuracy']:.3f})"
                rows.append((setting, cell, shown, flow.decay, seconds))
                panels[setting][cell] = flow
                print(f"{setting:<14} {cell:<18} {shown}  decay {flow.decay:.4f}/step  {seconds:.0f} s",
                      file=sys.stderr, flush=True)
    save_gradient_flow_panels(panels, args.png)
    print(describe(resolve_device(args.device)))
    print(f"{args.steps} training steps each (batch 64, hidden 128, Adam 2e-3); validation after the last step")
    print(f"{'task':<14} {'cell':<18} {'validation':<38} {'decay/step':>10} {'seconds':>8}")
    for setting, cell, shown, decay, seconds in rows:
        print(f"{setting:<14} {cell:<18} {shown:<38} {decay:>10.4f} {seconds:>8.0f}")
    print(f"gradient-flow curves: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
