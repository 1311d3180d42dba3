"""Exports against their checkpoints: the same outputs, and what running without torch saves
(process time, memory, size), one after the other, medians of 3.

Trains a word LM on WikiText-2 (configs/lm_wikitext2.yaml with a full softmax, which export
supports; --steps updates) unless --checkpoint names one, exports it in fp32 and int8, then:
per-token log-probabilities of WikiText-2 valid from both backends (largest difference);
perplexity of valid for the checkpoint, the fp32 and the int8 export; `rnnkit generate` as a
whole process (start-up included) and its peak memory, checkpoint against export; graph sizes.

With ``--tasks``, also a UPOS tagger (predictions on the UD English-EWT test set), an
rt-polarity classifier (labels on dev) and the ETTh1 forecaster (test MSE), each trained for
``--minutes`` from its shipped config (the comparison does not depend on how well trained),
and for the tagger `rnnkit predict` as a whole process, one sentence and the whole test set.
With ``--translation``, the shared Multi30k model (configs/translate_attention.yaml, trained
for ``--minutes`` unless ``--mt-checkpoint`` names one): beam-5 translation of
test_2016_flickr by torch fp32, torch --int8, the fp32 and the int8 export, each a whole
process (BLEU, lines identical, time, memory), one sentence's start to answer, graph sizes.

    python bench/export.py [--steps 200] [--checkpoint runs/x/best.pt] [--tasks] [--translation]
                           [--mt-checkpoint runs/mt/best.pt] [--minutes 3] [--quick]
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
                "train.lr_schedule=constant", "train.decay_by=steps"]
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
            every = out / "upos_test.txt"
            every.write_text("".join(x + "\n" for x in sentences), encoding="utf-8")
            single = one_sentence(out, sentences[0], "upos")
            paths = {"checkpoint": out / name / "best.pt", "export": out / f"{name}_onnx"}
            first = alternating({k: command("predict", str(p), "--input", str(single)) for k, p in paths.items()})
            lines.append(process_line("`rnnkit predict`, one sentence", first))
            bulk = alternating({k: command("predict", str(p), "--input", str(every)) for k, p in paths.items()})
            lines.append(f"  `rnnkit predict` of the {len(sentences):,} test sentences, whole process: checkpoint "
                         f"{bulk['checkpoint'][0]:.2f} s, export {bulk['export'][0]:.2f} s "
                         f"({bulk['checkpoint'][0] / bulk['export'][0]:.2f}x; goal >= 1.0)")
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


def medians(runs: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    return {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}


def alternating(cmds: dict[str, list[str]], repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Each whole-process command run ``repeats`` times, one after the other in turn: median
    wall seconds and peak RSS (MB) of each."""
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for name, cmd in cmds.items():
            runs[name].append(run(cmd))
    return medians(runs)


def one_sentence(out: Path, line: str, name: str) -> Path:
    path = out / f"{name}_one.txt"
    path.write_text(line + "\n", encoding="utf-8")
    return path


def translation(out: Path, minutes: float, checkpoint: str | None) -> list[str]:
    """The shared Multi30k model (configs/translate_attention.yaml) trained for ``minutes``
    unless given, exported fp32 and int8: beam-5 translations of test_2016_flickr from all four
    arithmetics (torch fp32, torch --int8, export fp32, export int8), each a whole process."""
    from rnnkit.data.vocab import read_parallel
    from rnnkit.metrics import bleu

    ckpt = Path(checkpoint) if checkpoint else out / "mt" / "best.pt"
    if not checkpoint:
        sets = [f"run_dir={out / 'mt'}", f"train.max_time={minutes * 60}", "train.eval_every=100000"]
        subprocess.run(command("train", "configs/translate_attention.yaml", *[x for s in sets for x in ("--set", s)]),
                       cwd=ROOT, check=True, capture_output=True)
    for suffix, extra in (("onnx", []), ("int8", ["--int8"])):
        subprocess.run(command("export", str(ckpt), "-o", str(out / f"mt_{suffix}"), *extra), cwd=ROOT, check=True,
                       capture_output=True)
    data = SHARED / "multi30k"
    src, refs = read_parallel(str(data / "test_2016_flickr.en"), str(data / "test_2016_flickr.fr"))
    kinds = {"torch fp32": [str(ckpt)], "torch int8": [str(ckpt), "--int8"], "export fp32": [str(out / "mt_onnx")],
             "export int8": [str(out / "mt_int8")]}
    whole = alternating({k: command("translate", *a, "--beam", "5", "--input", str(data / "test_2016_flickr.en"),
                                    "--output", str(out / f"mt_{k.replace(' ', '_')}.txt")) for k, a in kinds.items()})
    hyps = {k: (out / f"mt_{k.replace(' ', '_')}.txt").read_text(encoding="utf-8").splitlines() for k in kinds}
    base = hyps["torch fp32"]
    lines = [f"translation, {ckpt}: test_2016_flickr en-fr, {len(src):,} sentences, beam 5, whole processes "
             f"(median of 3)"]
    for k in kinds:
        same = sum(a == b for a, b in zip(base, hyps[k]))
        secs, mem = whole[k]
        lines.append(f"  {k:<11}: BLEU {bleu(hyps[k], refs):.2f}, {100 * same / len(base):.1f}% of lines as torch "
                     f"fp32, {secs:.1f} s ({len(src) / secs:.1f} sent/s), peak RSS {mem:.0f} MB")
    lines.append(f"  throughput export fp32 / torch fp32: {whole['torch fp32'][0] / whole['export fp32'][0]:.2f}x "
                 f"(goal >= 1.0); export int8 / torch int8: "
                 f"{whole['torch int8'][0] / whole['export int8'][0]:.2f}x (goal >= 1.2)")
    single = one_sentence(out, src[0], "mt")
    first = alternating({"checkpoint": command("translate", str(ckpt), "--input", str(single)),
                         "export": command("translate", str(out / "mt_onnx"), "--input", str(single))})
    lines.append(process_line("`rnnkit translate`, one sentence", first))
    size = lambda d: sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".onnx", ".weights")) / 1e6  # noqa: E731
    lines.append(f"  graphs: fp32 {size(out / 'mt_onnx'):.1f} MB, int8 {size(out / 'mt_int8'):.1f} MB "
                 f"({size(out / 'mt_int8') / size(out / 'mt_onnx'):.2f}x; goal <= 0.30)")
    return lines


def process_line(what: str, timing: dict[str, tuple[float, float]]) -> str:
    (t_c, m_c), (t_e, m_e) = timing["checkpoint"], timing["export"]
    return (f"  {what}, whole process, checkpoint / export: {t_c:.2f} / {t_e:.2f} s ({t_e / t_c:.2f}x; goal <= "
            f"0.33), peak RSS {m_c:.0f} / {m_e:.0f} MB ({m_e / m_c:.2f}x; goal <= 0.33)")


def language_model(args: argparse.Namespace, out: Path, text: str) -> None:
    """The word LM: log-probabilities, perplexities, `rnnkit generate` as a whole process, sizes."""
    import numpy as np
    import torch

    import rnnkit

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
    sizes = {name: sum(f.stat().st_size for f in (out / name).glob("lm_step.*")) / 1e6 for name in ("fp32", "int8")}
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="training updates of the word LM (no --checkpoint)")
    ap.add_argument("--checkpoint", help="a language-model checkpoint to export instead of training one")
    ap.add_argument("--tasks", action="store_true", help="also the tagger, classifier and forecaster on their data")
    ap.add_argument("--minutes", type=float, default=3.0, help="--tasks: training minutes of each")
    ap.add_argument("--translation", action="store_true", help="also the shared Multi30k translation model")
    ap.add_argument("--mt-checkpoint", help="--translation: a translation checkpoint instead of training one")
    ap.add_argument("--skip-lm", action="store_true", help="leave out the word LM (with --tasks or --translation)")
    ap.add_argument("--quick", action="store_true", help="a tiny model on the bundled text, 4 steps: checks that it "
                                                        "runs")
    args = ap.parse_args()
    if not args.quick and not (DATA / "valid.txt").is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    import torch

    text = (SAMPLE if args.quick else DATA / "valid.txt").read_text(encoding="utf-8")
    if args.quick:
        args.steps = 4
    out = Path(tempfile.mkdtemp())
    if args.skip_lm:
        print(describe(torch.device("cpu")))
    else:
        language_model(args, out, text)
    if args.tasks and not args.quick:
        for line in labelled_tasks(out, args.minutes):
            print(line)
    if args.translation and not args.quick:
        for line in translation(out, args.minutes, args.mt_checkpoint):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
