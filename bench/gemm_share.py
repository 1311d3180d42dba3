"""How much of a translation training step, and of beam-5 decoding, is matrix products.

Profiles rnnkit on configs/translate_attention.yaml (the peers' shared model) with
torch.profiler: the matrix products' own time (mm, addmm, bmm, oneDNN's linear kernels
and the fused RNN kernels) against the wall time of the same work run again without the
profiler. In fp32 every toolkit that trains or decodes this model has the same products to
compute (rnnkit already skips the ones on padding and on finished hypotheses), so
``wall / products`` is how much faster than rnnkit even an implementation whose other work
took no time at all could be, with the same matrix kernels on the same machine. A table of
the operators that take the most time follows each figure.

    python bench/gemm_share.py [--steps 20] [--checkpoint runs/.../best.pt] [--sentences 300] [--top 12]

Decoding needs a trained checkpoint (an untrained model decodes to the length limit);
without one that part is skipped.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "multi30k"
CONFIG = ROOT / "configs" / "translate_attention.yaml"
MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv",
          "aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward", "mkldnn::_linear_pointwise"}


def report(what: str, prof, wall: float, top: int) -> None:
    """The products' share of ``wall`` (the same work timed without the profiler) and the
    operators that take the most of the profiled time."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    mat = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / 1e6
    profiled = sum(e.self_cpu_time_total for e in events) / 1e6
    share = mat / wall
    print(f"{what}: {wall:.2f} s without the profiler, matrix products {mat:.2f} s; "
          f"matrix share {share:.0%}, ceiling for the same products {1 / share:.2f}x")
    print(f"  {'operator':<42} {'self s':>7} {'share':>6} {'calls':>6}  product")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"  {e.key[:42]:<42} {seconds:7.3f} {seconds / profiled:6.1%} {e.count:6d}  "
              f"{'yes' if e.key in MATMUL else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps timed and profiled (after 3 warm-up steps)")
    ap.add_argument("--checkpoint", help="a trained translate_attention checkpoint, for the decoding part")
    ap.add_argument("--sentences", type=int, default=300, help="test_2016_flickr sentences decoded")
    ap.add_argument("--top", type=int, default=12, help="operators listed under each figure")
    ap.add_argument("--quick", action="store_true", help="one short round on a few sentences: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.sentences, args.top = 1, 4, 3
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the shared corpora are needed)")
        return 0
    from bench.machine import cpu_description
    from rnnkit.config import load_config
    from rnnkit.data.vocab import read_lines
    from rnnkit.hardware import keep_freed_memory
    from rnnkit.runs import load_task, prepare_trainer

    keep_freed_memory()      # as the rnnkit command trains
    print(f"device: {cpu_description()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [f"run_dir={tmp}/run", "train.device=cpu", "train.max_time=null"])
        trainer = prepare_trainer(cfg)
        params = [p for p in trainer.task.model.parameters() if p.requires_grad]
        batches = trainer.task.train_batches(0)
        for i in range(3):
            trainer._step(batches[i], params)
        timed = [batches[i] for i in range(3, 3 + args.steps)]
        start = time.perf_counter()
        for batch in timed:
            trainer._step(batch, params)
        wall = time.perf_counter() - start
        with profile() as prof:
            for batch in timed:
                trainer._step(batch, params)
    report(f"training, {args.steps} steps", prof, wall, args.top)

    if not args.checkpoint:
        print("decoding: skipped (give --checkpoint with a trained model)")
        return 0
    task = load_task(args.checkpoint, "cpu")
    lines = read_lines(str(DATA / "test_2016_flickr.en"))[: args.sentences]
    task.translate(lines[:64], beam=5, batch_size=64)
    start = time.perf_counter()
    task.translate(lines, beam=5, batch_size=64, alpha=1.0)
    wall = time.perf_counter() - start
    with profile() as prof:
        task.translate(lines, beam=5, batch_size=64, alpha=1.0)
    report(f"beam-5 decoding, {len(lines)} sentences", prof, wall, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
