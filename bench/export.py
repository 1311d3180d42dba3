"""Exports against their checkpoints: the same outputs, and what running without torch saves
(process time, memory, size), one after the other, medians of 3.

Trains a word LM on WikiText-2 (configs/lm_wikitext2.yaml with a full softmax, which export
supports; --steps updates) unless --checkpoint names one, exports it in fp32 and int8, then:
per-token log-probabilities of WikiText-2 valid from both backends (largest difference);
perplexity of valid for the checkpoint, the fp32 and the int8 export; `rnnkit generate` as a
whole process (start-up included) and its peak memory, checkpoint against export; graph sizes.

With ``--tasks``, also a UPOS tagger (predictions on the UD English-EWT test set), an
rt-polarity classifier (labels on dev) and the ETTh1 forecaster (test MSE), each trained for
``--minutes`` from its shipped config (the comparison does not depend on how well trained).

    python bench/export.py [--steps 200] [--checkpoint runs/x/best.pt] [--tasks] [--minutes 3] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DATA = SHARED / "wikitext-2"
FULL_SOFTMAX = ["model.output=softmax", "model.tie_weights=false", "train.max_time=null", "train.warmup_steps=0",
                "train.lr_schedule=constant"]
SAMPLE = ROOT / "data" / "harbour.txt"       # --quick: the bundled text, no corpus needed
QUICK = ["model.embedding_dim=32", "model.hidden_size=32", "data.bptt=16",
         *(f"data.{split}={SAMPLE}" for split in ("train", "valid", "test"))]


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a whole process (measured by a wrapper of its own, so
    that each figure is that process's alone)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, int(res.stdout.split()[-1]) / 1024


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnnkit", *args]


def labelled_tasks(out: Path, minutes: float) -> list[str]:
    """The tagger, the classifier and the forecaster: each trained briefly, exported, and its
    outputs on held-out data compared between the two backends."""
    import rnnkit
    from rnnkit.data.labeled import read_labeled, read_tagged

    lines = []
    for name, config in (("upos", "tagger_upos"), ("sentiment", "sentiment"), ("etth1", "forecast_etth1")):
        sets = [f"run_dir={out / name}", f"train.max_time={minutes * 60}", "train.eval_every=200"]
        subprocess.run(command("train", f"configs/{config}.yaml", *[x for s in sets for x in ("--set", s)]),
                       cwd=ROOT, check=True, capture_output=True)
        for suffix, extra in (("onnx", []), ("int8", ["--int8"])):
            subprocess.run(command("export", str(out / name / "best.pt"), "-o", str(out / f"{name}_{suffix}"), *extra),
                           cwd=ROOT, check=True, capture_output=True)
        a, b = rnnkit.load(out / name / "best.pt"), rnnkit.load(out / f"{name}_onnx")
        q = rnnkit.load(out / f"{name}_int8")
        if name == "upos":
            test = SHARED / "ud-english-ewt" / "en_ewt-ud-test.conllu"
            sentences = [" ".join(s.tokens) for s in read_tagged(str(test), "conllu", 2, 4)]
            same = sum(x == y for x, y in zip(a.predict(sentences), b.predict(sentences)))
            acc = [m.score(test)["accuracy"] for m in (a, b, q)]
            lines.append(f"UPOS tagger, UD English-EWT test: {same:,} of {len(sentences):,} sentences tagged "
                         f"identically; accuracy {100 * acc[0]:.2f} / {100 * acc[1]:.2f} / {100 * acc[2]:.2f} "
                         f"(checkpoint / export / int8 export)")
        elif name == "sentiment":
            dev = SHARED / "rt-polarity" / "dev.tsv"
            texts = [" ".join(s.tokens) for s in read_labeled(str(dev))]
            same = sum(x["label"] == y["label"] for x, y in zip(a.predict(texts), b.predict(texts)))
            acc = [m.score(dev)["accuracy"] for m in (a, b, q)]
            lines.append(f"rt-polarity classifier, dev: {same:,} of {len(texts):,} labels identical; accuracy "
                         f"{100 * acc[0]:.2f} / {100 * acc[1]:.2f} / {100 * acc[2]:.2f}")
        else:
            csv = SHARED / "ett" / "ETTh1.csv"
            mse = [m.score(csv, split="test")["mse"] for m in (a, b, q)]
            lines.append(f"ETTh1 forecaster, test MSE {mse[0]:.6f} / {mse[1]:.6f} / {mse[2]:.6f}: export equal to "
                         f"4 decimals {round(mse[0], 4) == round(mse[1], 4)}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training updates of the word LM (no --checkpoint)")
    ap.add_argument("--checkpoint", help="a language-model checkpoint to export instead of training one")
    ap.add_argument("--tasks", action="store_true", help="also the tagger, classifier and forecaster on their data")
    ap.add_argument("--minutes", type=float, default=3.0, help="--tasks: training minutes of each")
    ap.add_argument("--quick", action="store_true", help="a tiny model on the bundled text, 4 steps: checks that it "
                                                        "runs")
    args = ap.parse_args()
    if not args.quick and not (DATA / "valid.txt").is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    import numpy as np
    import torch

    import rnnkit

    text = (SAMPLE if args.quick else DATA / "valid.txt").read_text(encoding="utf-8")
    if args.quick:
        args.steps = 4
    out = Path(tempfile.mkdtemp())
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "lm" / "best.pt"
    if not args.checkpoint:
        sets = [f"run_dir={out / 'lm'}", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                *FULL_SOFTMAX, *(QUICK if args.quick else [])]
        subprocess.run(command("train", "configs/lm_wikitext2.yaml", *[x for s in sets for x in ("--set", s)]),
                       cwd=ROOT, check=True, capture_output=True)
    for name, extra in (("fp32", []), ("int8", ["--int8"])):
        subprocess.run(command("export", str(ckpt), "-o", str(out / name), *extra), cwd=ROOT, check=True,
                       capture_output=True)
    models = {"checkpoint": rnnkit.load(ckpt), "fp32": rnnkit.load(out / "fp32"), "int8": rnnkit.load(out / "int8")}
    ids = np.asarray(models["checkpoint"].task.encode(text)[:20000 if not args.quick else 2000])
    window = models["checkpoint"].task.cfg.data.bptt
    worst, state_a, state_b = 0.0, None, None
    for start in range(0, len(ids) - 1, window):      # one stream, the state carried, as scoring reads it
        x = ids[None, start:start + window]
        a, state_a = models["checkpoint"].task.step(x, state_a)
        b, state_b = models["fp32"].task.step(x, state_b)
        worst = max(worst, float(np.abs(a - b).max()))
    ppl = {name: m.score(text)["ppl"] for name, m in models.items()}
    timing: dict[str, list[tuple[float, float]]] = {"checkpoint": [], "fp32": []}
    for _ in range(3):                                # alternating, medians of 3
        for name, path in (("checkpoint", ckpt), ("fp32", out / "fp32")):
            timing[name].append(run(command("generate", str(path), "--prime", "The", "--length", "50",
                                           "--seed", "1")))
    sizes = {name: (out / name / "lm_step.onnx").stat().st_size / 1e6 for name in ("fp32", "int8")}
    print(describe(torch.device("cpu")))
    source = "the bundled sample" if args.quick else "WikiText-2 valid"
    print(f"word LM: {ckpt}, {len(models['checkpoint'].task.vocab):,} words; {source}, "
          f"{len(ids):,} tokens for the log-probabilities")
    print(f"largest per-token log-probability difference, export fp32 vs checkpoint: {worst:.2e} (goal <= 1e-4)")
    print("valid perplexity: " + ", ".join(f"{n} {p:.3f}" for n, p in ppl.items()))
    for name in timing:
        secs = statistics.median(t for t, _ in timing[name])
        mem = statistics.median(m for _, m in timing[name])
        print(f"`rnnkit generate` whole process, {name:<10}: {secs:.2f} s, peak RSS {mem:.0f} MB")
    ratio = statistics.median(t for t, _ in timing["checkpoint"]) / statistics.median(t for t, _ in timing["fp32"])
    print(f"start-to-finish, checkpoint / export: {ratio:.2f}x")
    print(f"graph size: fp32 {sizes['fp32']:.2f} MB, int8 {sizes['int8']:.2f} MB "
          f"({sizes['int8'] / sizes['fp32']:.2f}x)")
    if args.tasks and not args.quick:
        for line in labelled_tasks(out, args.minutes):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
