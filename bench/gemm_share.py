"""How much of a translation training step, and of beam-5 decoding, is matrix products.

Profiles rnnkit on configs/translate_attention.yaml (the peers' shared model) with
torch.profiler and splits the self CPU time into matrix products (mm, addmm, bmm and the
fused RNN kernels) and everything else. In fp32 every toolkit that trains or decodes this
model has the same products to compute (rnnkit already skips the ones on padding and on
finished hypotheses), so ``1 / share`` is how much faster than rnnkit even an
implementation whose other work took no time at all could be, with the same matrix
kernels on the same machine. The profiler's own overhead falls on the many small
operations, so the share printed is, if anything, too low.

    python bench/gemm_share.py [--steps 10] [--checkpoint runs/.../best.pt]

Decoding needs a trained checkpoint (an untrained model decodes to the length limit);
without one that part is skipped.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import profile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"
CONFIG = ROOT / "configs" / "translate_attention.yaml"
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
          "aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"}


def split(prof) -> tuple[float, float]:
    """Seconds of self CPU time in matrix products and in everything else."""
    mat = other = 0.0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            if event.key in MATMUL:
                mat += event.self_cpu_time_total
            else:
                other += event.self_cpu_time_total
    return mat / 1e6, other / 1e6


def report(what: str, mat: float, other: float) -> None:
    share = mat / (mat + other)
    print(f"{what}: matrix products {mat:.2f} s, other operations {other:.2f} s; "
          f"matrix share {share:.0%}, ceiling for the same products {1 / share:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps profiled (after 3 warm-up steps)")
    ap.add_argument("--checkpoint", help="a trained translate_attention checkpoint, for the decoding part")
    ap.add_argument("--sentences", type=int, default=300, help="test_2016_flickr sentences decoded")
    ap.add_argument("--quick", action="store_true", help="one short round on a few sentences: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.sentences = 1, 4
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the shared corpora are needed)")
        return 0
    from rnnkit.config import load_config
    from rnnkit.data.vocab import read_lines
    from rnnkit.runs import load_task, prepare_trainer

    print(f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [f"run_dir={tmp}/run", "train.device=cpu", "train.max_time=null"])
        trainer = prepare_trainer(cfg)
        params = [p for p in trainer.task.model.parameters() if p.requires_grad]
        batches = trainer.task.train_batches(0)
        for i in range(3):
            trainer._step(batches[i], params)
        with profile() as prof:
            for i in range(3, 3 + args.steps):
                trainer._step(batches[i], params)
    report(f"training, {args.steps} steps", *split(prof))

    if not args.checkpoint:
        print("decoding: skipped (give --checkpoint with a trained model)")
        return 0
    task = load_task(args.checkpoint, "cpu")
    lines = read_lines(str(DATA / "test_2016_flickr.en"))[: args.sentences]
    task.translate(lines[:64], beam=5, batch_size=64)
    with profile() as prof:
        task.translate(lines, beam=5, batch_size=64, alpha=1.0)
    report(f"beam-5 decoding, {len(lines)} sentences", *split(prof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
