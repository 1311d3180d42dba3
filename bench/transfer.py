"""Pretrained language models for the small labelled tasks: ULMFiT-style fine-tuning and
Flair-style frozen LM features, against the shipped configs with the same training budget.

Stages (each a plain ``rnnkit train`` run; a finished run in the output folder is reused):

1. pretraining text: WikiText-2 train plus the text of the labelled tasks' training splits
   (rt-polarity train, UD English-EWT train, Universal NER dev's first 1,801 sentences, the
   part the NER config trains on); never validation or test text.
2. a forward and a backward word LM on it (configs/lm_wikitext2.yaml, ``--pretrain-minutes``).
3. rt-polarity: the shipped classifier; ULMFiT (both LMs fine-tuned on the task's training
   text, the classifier initialised from them, slanted triangular learning rates,
   discriminative rates by layer, gradual unfreezing); the shipped classifier with the LMs'
   states as features. Dev accuracy (the selection metric; the held-back test is checked elsewhere).
4. Universal NER: the shipped BiLSTM-CRF with and without the LM features; test span F1.
5. UD English-EWT UPOS: the shipped tagger with and without the LM features, ``--upos-minutes``
   each; test accuracy.

    python bench/transfer.py [--pretrain-minutes 60] [--upos-minutes 40] [--stages ...] [--quick]

``--quick`` runs every stage for a few seconds (a check of the plumbing, not a result).
Needs ../shared/data. Prints a table with the CPU and the minutes of each stage.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WIKI = DATA / "wikitext-2"
RT = DATA / "rt-polarity"
NER_FILE = DATA / "uner-english-ewt" / "en_ewt-ud-dev.iob2"
NER_TEST = DATA / "uner-english-ewt" / "en_ewt-ud-test.iob2"
EWT = DATA / "ud-english-ewt"
LM_SIZE = 400          # configs/lm_wikitext2.yaml's embedding and hidden size: what init_from needs
STAGES = ("pretrain", "sentiment", "ner", "upos")


class Bench:
    def __init__(self, out: Path, quick: bool):
        self.out, self.quick = out, quick
        self.minutes: dict[str, float] = {}

    def train(self, name: str, config: str, sets: list[str], minutes: float) -> Path:
        """``rnnkit train`` for ``minutes`` (unless already finished); returns the run folder."""
        run = self.out / name
        if (run / "last.pt").exists():
            print(f"{name}: reusing {run}", flush=True)
        else:
            seconds = 5 if self.quick else minutes * 60
            args = [f"run_dir={run}", f"train.max_time={seconds}", *sets]
            if self.quick:
                args += ["train.eval_every=5", "train.log_every=5"]
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "rnnkit", "train", str(ROOT / config), *[x for s in args for x in ("--set", s)]]
            print("$ rnnkit train " + " ".join(cmd[4:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            self.minutes[name] = (time.perf_counter() - start) / 60
        return run

    def evaluate(self, run: Path, *args: str) -> dict:
        cmd = [sys.executable, "-m", "rnnkit", "eval", str(run / "best.pt"), *args, "--json"]
        res = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1])


def pretraining_text(out: Path) -> Path:
    """WikiText-2 train and the labelled tasks' training text, one sentence or paragraph a line."""
    from rnnkit.data.labeled import read_labeled, read_tagged

    path = out / "pretrain.txt"
    if path.exists():
        return path
    lines = (WIKI / "train.txt").read_text(encoding="utf-8").splitlines()
    lines += [" ".join(s.tokens) for s in read_labeled(str(RT / "train.tsv"))]
    lines += [" ".join(s.tokens) for s in read_tagged(str(EWT / "en_ewt-ud-train.conllu"), "conllu", 2, 4)]
    lines += [" ".join(s.tokens) for s in read_tagged(str(NER_FILE), "columns", 2, 3)[:1801]]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def task_text(out: Path) -> tuple[Path, Path]:
    """rt-polarity's training sentences for LM fine-tuning: the first 95% train, the rest validate."""
    from rnnkit.data.labeled import read_labeled

    sentences = [" ".join(s.tokens) for s in read_labeled(str(RT / "train.tsv"))]
    cut = int(len(sentences) * 0.95)
    train, valid = out / "rt_train.txt", out / "rt_valid.txt"
    train.write_text("\n".join(sentences[:cut]) + "\n", encoding="utf-8")
    valid.write_text("\n".join(sentences[cut:]) + "\n", encoding="utf-8")
    return train, valid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-minutes", type=float, default=60.0, help="each of the two LMs")
    ap.add_argument("--finetune-minutes", type=float, default=3.0, help="each LM on the task's text (ULMFiT)")
    ap.add_argument("--task-minutes", type=float, default=10.0, help="sentiment and NER runs (as shipped)")
    ap.add_argument("--upos-minutes", type=float, default=40.0, help="each UPOS tagger")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "transfer")
    ap.add_argument("--quick", action="store_true", help="seconds per run: checks the plumbing only")
    args = ap.parse_args()
    if not (WIKI / "train.txt").is_file() or not (RT / "train.tsv").is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    bench = Bench(args.out, args.quick)
    results: dict[str, dict] = {}
    wiki = [f"data.valid={WIKI / 'valid.txt'}", f"data.test={WIKI / 'test.txt'}"]
    text = pretraining_text(args.out)
    lm = {}
    for direction, reverse in (("fwd", "false"), ("bwd", "true")):
        lm[direction] = bench.train(f"lm_{direction}", "configs/lm_wikitext2.yaml",
                                    [f"data.train={text}", *wiki, f"data.reverse={reverse}",
                                     f"train.max_steps={int(14000 * args.pretrain_minutes / 60)}"],
                                    args.pretrain_minutes) / "best.pt"
    features = f"model.lm_features=[{lm['fwd']}, {lm['bwd']}]"

    if "sentiment" in args.stages:
        dev = ["--data", str(RT / "dev.tsv")]
        base = bench.train("sentiment_shipped", "configs/sentiment.yaml", [], args.task_minutes)
        results["rt-polarity dev accuracy, shipped"] = bench.evaluate(base, *dev)
        train_text, valid_text = task_text(args.out)
        tuned = {}
        for direction, reverse in (("fwd", "false"), ("bwd", "true")):
            tuned[direction] = bench.train(
                f"lm_{direction}_rt", "configs/lm_wikitext2.yaml",
                [f"model.init_from={lm[direction]}", f"data.train={train_text}", f"data.valid={valid_text}",
                 "data.test=null", f"data.reverse={reverse}", "train.lr_schedule=slanted_triangular",
                 "train.warmup_steps=0", "train.max_steps=400", "train.eval_every=100"],
                args.finetune_minutes) / "best.pt"
        ulmfit = bench.train(
            "sentiment_ulmfit", "configs/sentiment.yaml",
            [f"model.init_from={tuned['fwd']}", f"model.init_from_backward={tuned['bwd']}",
             f"model.embedding_dim={LM_SIZE}", f"model.hidden_size={LM_SIZE}", "model.num_layers=2",
             "train.lr_schedule=slanted_triangular", "train.max_steps=1700", "train.layer_lr_decay=0.38",
             "train.unfreeze_every=170", "train.early_stopping=null"], args.task_minutes)
        results["rt-polarity dev accuracy, ULMFiT"] = bench.evaluate(ulmfit, *dev)
        flair = bench.train("sentiment_features", "configs/sentiment.yaml", [features], args.task_minutes)
        results["rt-polarity dev accuracy, LM features"] = bench.evaluate(flair, *dev)

    if "ner" in args.stages:
        test = ["--data", str(NER_TEST)]
        for name, sets in (("shipped", []), ("LM features", [features])):
            run = bench.train(f"ner_{name.split()[0].lower()}", "configs/tagger_ner.yaml", sets, args.task_minutes)
            results[f"UNER test span F1, {name}"] = bench.evaluate(run, *test)

    if "upos" in args.stages:
        test = ["--data", str(EWT / "en_ewt-ud-test.conllu")]
        for name, sets in (("shipped", []), ("LM features", [features])):
            run = bench.train(f"upos_{name.split()[0].lower()}", "configs/tagger_upos.yaml", sets, args.upos_minutes)
            results[f"UPOS test accuracy, {name}"] = bench.evaluate(run, *test)

    (args.out / "results.json").write_text(json.dumps({"results": results, "minutes": bench.minutes}, indent=1))
    print(f"\ntransfer from pretrained LMs; CPU {cpu_description()}" + ("  (--quick: not a result)" if args.quick else ""))
    print("| measure | value |")
    print("| --- | --- |")
    for name, r in results.items():
        value = r.get("f1") if "F1" in name else r.get("accuracy")
        print(f"| {name} | {100 * value:.2f} |")
    print("\nminutes per run: " + ", ".join(f"{k} {v:.1f}" for k, v in bench.minutes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
