"""CPU arithmetic: fp32 against bf16 (autocast) for translation training, and fp32 against
bf16 and int8 for beam-5 decoding of test_2016_flickr, in one process, one after the other.

Training: configs/translate_attention.yaml (the peers' shared model) for --steps steps each,
target tokens per second from metrics.jsonl (after two log windows of warm-up), and the
validation loss at the last step. Decoding: a trained checkpoint (--checkpoint), test_2016_flickr
with beam 5, seconds in-process and sacreBLEU.

    python bench/bf16.py --checkpoint runs/translate_attention/best.pt [--steps 200]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "multi30k"


QUICK = ["model.embedding_dim=16", "model.encoder.hidden_size=16", "model.decoder.hidden_size=32",
         "train.log_every=1"]   # --quick: checks that it runs


def train(precision: str, steps: int, run_dir: Path, extra: list[str] = ()) -> tuple[float, float]:
    sets = [f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.eval_every={steps}", "train.log_every=20",
            "train.max_time=null", f"train.precision={precision}", "train.device=cpu", *extra]
    cmd = [sys.executable, "-m", "rnnkit", "train", "configs/translate_attention.yaml",
           *[x for s in sets for x in ("--set", s)]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in rows if r["kind"] == "train"][2:] or [r for r in rows if r["kind"] == "train"]
    tok_s = sum(r["tokens"] for r in logs) / sum(r["tokens"] / r["tokens_per_s"] for r in logs)
    return tok_s, [r for r in rows if r["kind"] == "eval"][-1]["valid_loss"]


def decode(checkpoint: str, options: list[str], sentences: int | None = None) -> tuple[float, float]:
    from rnnkit.api import inference_arithmetic
    from rnnkit.metrics import bleu
    from rnnkit.runs import load_task

    task = load_task(checkpoint, "cpu")
    src = (DATA / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:sentences]
    ref = (DATA / "test_2016_flickr.fr").read_text(encoding="utf-8").splitlines()[:sentences]
    precision = "bf16" if "bf16" in options else "fp32"
    with inference_arithmetic(task, precision, "int8" in options, print)():
        start = time.perf_counter()
        hyps = [t.text for t in task.translate(src, beam=5, batch_size=64, alpha=1.0)]
        seconds = time.perf_counter() - start
    return seconds, bleu(hyps, ref)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a trained translate_attention checkpoint to decode with")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="a small model, 3 steps, 4 sentences: checks that it runs")
    args = ap.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the shared corpora are needed)")
        return 0
    if not args.checkpoint and not args.quick:
        ap.error("--checkpoint is required (a trained translate_attention model)")
    extra, sentences = (QUICK, 4) if args.quick else ([], None)
    if args.quick:
        args.steps = 3
    import torch

    from rnnkit.hardware import native_bf16

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = train("fp32", args.steps, Path(tmp) / "fp32", extra)
        bf16 = train("bf16", args.steps, Path(tmp) / "bf16", extra)
        checkpoint = args.checkpoint or str(Path(tmp) / "fp32" / "best.pt")
        rows = {name: decode(checkpoint, opts, sentences) for name, opts in
                (("fp32", []), ("bf16", ["bf16"]), ("int8", ["int8"]))}
    print(describe(torch.device("cpu")), f"; native bf16: {native_bf16()}")
    print(f"training, {args.steps} steps each: fp32 {fp32[0]:,.0f} tgt tok/s (valid loss {fp32[1]:.4f}), "
          f"bf16 {bf16[0]:,.0f} tgt tok/s (valid loss {bf16[1]:.4f}); ratio bf16/fp32 {bf16[0] / fp32[0]:.2f}")
    base = rows["fp32"][0]
    for name, (seconds, score) in rows.items():
        print(f"beam-5 decoding {name:<10} {seconds:6.1f} s  BLEU {score:.2f}  speed vs fp32 {base / seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
