"""Training speed of the explicit recurrent cells against torch.nn's fused kernels.

rnnkit's Trainer trains the tiny-shakespeare character LM of configs/char_lm.yaml's
shapes (2 layers, hidden 512, embedding 128, batch 64, bptt 128) with each recurrent
implementation in turn, alternating over rounds in this one process, and prints the
time per training step of each and its ratio to the fused one. Targets on CPU: plain
explicit LSTM at most 1.5x fused, with layer norm at most 2x.

    python bench/explicit_cells.py [--steps 6] [--rounds 2] [--cell lstm] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import lm_throughput  # noqa: E402
from bench.lm_throughput import CORPUS, rnnkit_loop  # noqa: E402
from bench.machine import describe  # noqa: E402

VARIANTS = {
    "fused": ["model.impl=fused"],
    "explicit": ["model.impl=explicit"],
    "explicit + layer norm": ["model.impl=explicit", "model.layer_norm=true"],
}
TARGETS = {"explicit": 1.5, "explicit + layer norm": 2.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn_tanh"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a small model, one short round: checks that it runs")
    args = ap.parse_args()
    extra = lm_throughput.use_quick_shapes() if args.quick else []
    if args.quick:
        args.steps, args.warmup, args.rounds = 2, 1, 1
    if not CORPUS.exists():
        print(f"skipped: {CORPUS} is absent (the shared corpora are needed)")
        return 0
    from rnnkit.training.interface import resolve_device

    device = resolve_device(args.device)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, overrides in VARIANTS.items():
                run = Path(tmp) / f"r{r}-{name.replace(' ', '_')}"
                tok_s = rnnkit_loop(device, args.warmup, args.steps, run, [f"model.cell={args.cell}", *overrides, *extra])
                seconds[name].append(lm_throughput.BATCH * lm_throughput.BPTT / tok_s)
                print(f"round {r + 1}: {name}: {seconds[name][-1]:.3f} s/step", file=sys.stderr)
    print(describe(device))
    shape = f"2x{lm_throughput.HIDDEN}, batch {lm_throughput.BATCH}, bptt {lm_throughput.BPTT}"
    print(f"{args.cell} character LM, {shape}; best of {args.rounds} rounds "
          f"of {args.steps} steps")
    fused = min(seconds["fused"])
    for name in VARIANTS:
        best = min(seconds[name])
        target = f"  (target <= {TARGETS[name]})" if name in TARGETS else ""
        print(f"{name:<22} {best:.3f} s/step  ratio to fused {best / fused:.2f}{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
