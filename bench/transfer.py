"""Pretrained language models for the small labelled tasks: ULMFiT-style fine-tuning and
Flair-style frozen LM features, against the shipped configs with the same training budget.

Stages (each a plain ``rnnkit train`` run; a finished run in the output folder is reused):

1. pretraining text: WikiText-2 train plus the text of the labelled tasks' training splits
   (rt-polarity train, UD English-EWT train, Universal NER dev's first 1,801 sentences, the
   part the NER config trains on); never validation or test text.
2. a forward and a backward word LM on it (configs/lm_wikitext2.yaml, ``--pretrain-minutes``),
   and, for the feature sets with characters, a forward and a backward character LM
   (configs/lm_char_flair.yaml, ``--char-pretrain-minutes``; Flair's kind of LM).
   ``--more-pretrain-minutes`` (``--more-char-pretrain-minutes``) then trains each word
   (character) LM that much longer (``model.init_from`` its checkpoint, a fresh cosine
   schedule at half the peak rate) and the tasks use those.
3. rt-polarity: the shipped classifier; ULMFiT (both LMs fine-tuned on the task's training
   text, the classifier initialised from them, slanted triangular learning rates,
   discriminative rates by layer, gradual unfreezing); the shipped classifier with the LMs'
   states as features. Dev accuracy (the selection metric; the held-back test is checked elsewhere).
4. Universal NER: the shipped BiLSTM-CRF with and without the LM features; test span F1.
5. UD English-EWT UPOS: the shipped tagger with the LM features for ``--upos-minutes``; test
   accuracy (``--upos-shipped`` also retrains the shipped tagger; else docs/benchmarks.md's
   40-minute figure, measured under the same conditions, is the baseline).

The LM features of stages 3-5 come in the sets ``--features`` names: ``word`` (the two word
LMs), ``char`` (the two character LMs), ``word+char`` (all four); each LM gives its top layer,
or with ``--lm-layers all`` a learned mix of all its layers (ELMo's; runs named ``..._mix``).
``--init-vectors`` also starts those runs' word vectors from the forward word LM's
(``model.init_from`` with ``model.init_layers: 0``; runs named ``..._vec``), and
``--ema-decay D`` trains them with ``train.ema_decay: D`` (runs named ``..._ema``).

Every run uses one thread and two run at once (``--threads``, ``--lanes``), the conditions
under which the shipped configs' figures in docs/benchmarks.md were measured.

    python bench/transfer.py [--pretrain-minutes 50] [--more-pretrain-minutes 60] [--upos-minutes 40]
                             [--stages ...] [--features word word+char] [--upos-features word]
                             [--sentiment-features word] [--lm-layers top] [--init-vectors] [--ema-decay D]
                             [--no-ulmfit] [--quick]

``--quick`` runs every stage for a few seconds (a check of the plumbing, not a result).
Needs ../shared/data. Prints a table with the CPU and the minutes of each stage.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WIKI = DATA / "wikitext-2"
RT = DATA / "rt-polarity"
NER_FILE = DATA / "uner-english-ewt" / "en_ewt-ud-dev.iob2"
NER_TEST = DATA / "uner-english-ewt" / "en_ewt-ud-test.iob2"
EWT = DATA / "ud-english-ewt"
LM_STEPS_PER_MINUTE = 115   # configs/lm_wikitext2.yaml at one thread beside a second run, validation included (measured: 2.15 steps/s)
CLM_STEPS_PER_MINUTE = 28  # configs/lm_char_flair.yaml likewise (measured: 1,256 steps in 45 minutes)
LM_SIZE = 400          # configs/lm_wikitext2.yaml's embedding and hidden size: what init_from needs
STAGES = ("pretrain", "sentiment", "ner", "upos")
FEATURE_SETS = {"word": ("lm_fwd", "lm_bwd"), "char": ("clm_fwd", "clm_bwd"),
                "word+char": ("lm_fwd", "lm_bwd", "clm_fwd", "clm_bwd")}
SUFFIX = {"word": "", "char": "_c", "word+char": "_wc"}   # "word" keeps the first runs' names
FEATURE_CACHE_MB = 4096      # four LMs' features (2,848 a word) of UD English-EWT train and dev: ~2.6 GB


class Bench:
    def __init__(self, out: Path, quick: bool, threads: int):
        self.out, self.quick, self.threads = out, quick, threads
        self.minutes: dict[str, float] = {}

    def train(self, name: str, config: str, sets: list[str], minutes: float) -> Path:
        """``rnnkit train`` for ``minutes`` (unless already finished); returns the run folder."""
        run = self.out / name
        if (run / "last.pt").exists():
            print(f"{name}: reusing {run}", flush=True)
        else:
            seconds = 5 if self.quick else minutes * 60
            args = [f"run_dir={run}", f"train.max_time={seconds}", f"train.num_threads={self.threads}", *sets]
            if self.quick:     # a few steps of a small model: the plumbing, not a result
                args += ["train.eval_every=2", "train.log_every=2", "train.max_steps=3", "train.warmup_steps=0"]
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "rnnkit", "train", str(ROOT / config), *[x for s in args for x in ("--set", s)]]
            print("$ rnnkit train " + " ".join(cmd[4:]), flush=True)
            run.parent.mkdir(parents=True, exist_ok=True)
            with open(self.out / f"{name}.log", "w") as log:   # two runs at once: one log each
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
            self.minutes[name] = (time.perf_counter() - start) / 60
            print(f"{name}: done in {self.minutes[name]:.1f} min", flush=True)
        return run

    def evaluate(self, run: Path, *args: str) -> dict:
        cmd = [sys.executable, "-m", "rnnkit", "eval", str(run / "best.pt"), *args, "--json"]
        res = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1])


def run_jobs(jobs: dict[str, tuple[list[str], Callable[[], None]]], lanes: int) -> None:
    """Run ``jobs`` (name -> (names it waits for, work)) on ``lanes`` threads, in the order given
    as far as the dependencies allow. The first failure stops the rest."""
    done: set[str] = set()
    started: set[str] = set()
    failed: list[BaseException] = []
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while True:
                    if failed or len(started) == len(jobs):
                        return
                    ready = [n for n, (deps, _) in jobs.items() if n not in started and all(d in done for d in deps)]
                    if ready:
                        name = ready[0]
                        started.add(name)
                        break
                    cond.wait()
            try:
                jobs[name][1]()
            except BaseException as err:  # noqa: BLE001 - reported below, and stops the other lane
                with cond:
                    failed.append(err)
                    cond.notify_all()
                return
            with cond:
                done.add(name)
                cond.notify_all()

    threads = [threading.Thread(target=worker) for _ in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]


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
    ap.add_argument("--pretrain-minutes", type=float, default=50.0, help="each of the two LMs (trained side by side)")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="the LMs' cosine schedule length (default: what --pretrain-minutes allows at one thread)")
    ap.add_argument("--more-pretrain-minutes", type=float, default=0.0,
                    help="then train each word LM this much longer, from its checkpoint with a fresh cosine "
                         "schedule at half the peak rate (runs lm_fwd_more, lm_bwd_more; the tasks use those)")
    ap.add_argument("--more-char-pretrain-minutes", type=float, default=0.0,
                    help="the same for the character LMs (runs clm_fwd_more, clm_bwd_more)")
    ap.add_argument("--char-pretrain-minutes", type=float, default=45.0,
                    help="each of the two character LMs (trained side by side; steps: the config's)")
    ap.add_argument("--features", nargs="+", default=["word", "word+char"], choices=list(FEATURE_SETS),
                    help="LM feature sets for the sentiment, NER and UPOS runs")
    ap.add_argument("--upos-features", nargs="+", default=None, choices=list(FEATURE_SETS),
                    help="the UPOS runs' sets, if not --features (each is --upos-minutes long)")
    ap.add_argument("--sentiment-features", nargs="+", default=None, choices=list(FEATURE_SETS),
                    help="the sentiment runs' sets, if not --features")
    ap.add_argument("--lm-layers", choices=("top", "all"), default="top",
                    help="the feature runs' model.lm_features_layers: each LM's top layer, or a learned mix "
                         "of all its layers (runs named ..._mix)")
    ap.add_argument("--init-vectors", action="store_true",
                    help="the feature runs' word vectors start as the forward word LM's (model.init_layers 0; "
                         "runs named ..._vec)")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="the feature runs' train.ema_decay: a moving average of the weights (runs named ..._ema)")
    ap.add_argument("--no-ulmfit", action="store_true", help="leave out the ULMFiT runs of the sentiment stage")
    ap.add_argument("--finetune-minutes", type=float, default=4.0, help="each LM on the task's text (ULMFiT)")
    ap.add_argument("--task-minutes", type=float, default=10.0, help="sentiment and NER runs (as shipped)")
    ap.add_argument("--upos-minutes", type=float, default=40.0, help="the UPOS tagger with LM features")
    ap.add_argument("--upos-shipped", action="store_true",
                    help="also train the shipped UPOS tagger for --upos-minutes (else docs/benchmarks.md's 40-minute figure)")
    ap.add_argument("--threads", type=int, default=1, help="threads per run (the shipped figures used 1)")
    ap.add_argument("--lanes", type=int, default=2, help="runs at once")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "transfer")
    ap.add_argument("--quick", action="store_true", help="seconds per run: checks the plumbing only")
    args = ap.parse_args()
    if not (WIKI / "train.txt").is_file() or not (RT / "train.tsv").is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    args.upos_features = args.upos_features or args.features
    args.sentiment_features = args.sentiment_features or args.features
    bench = Bench(args.out, args.quick, args.threads)
    if args.quick:
        global LM_SIZE
        LM_SIZE = 32
    results: dict[str, dict] = {}
    wiki = [f"data.valid={WIKI / 'valid.txt'}", f"data.test={WIKI / 'test.txt'}"]
    text = pretraining_text(args.out)
    steps = args.pretrain_steps or int(LM_STEPS_PER_MINUTE * args.pretrain_minutes)
    # the runs that give each LM of FEATURE_SETS (the continued ones, if asked for)
    lm_runs = {f"{kind}_{d}": f"{kind}_{d}" for kind in ("lm", "clm") for d in ("fwd", "bwd")}
    for kind, minutes in (("lm", args.more_pretrain_minutes), ("clm", args.more_char_pretrain_minutes)):
        if minutes > 0:
            lm_runs.update({f"{kind}_{d}": f"{kind}_{d}_more" for d in ("fwd", "bwd")})
    checkpoints = {name: args.out / run / "best.pt" for name, run in lm_runs.items()}
    tuned = {d: args.out / f"lm_{d}_rt" / "best.pt" for d in ("fwd", "bwd")}
    char_lms = any(n.startswith("clm") for s in args.features + args.upos_features + args.sentiment_features
                   for n in FEATURE_SETS[s])

    def needs(name: str) -> list[str]:
        """The runs a feature set's LMs (and, with --init-vectors, the word vectors) come from."""
        runs = [lm_runs[n] for n in FEATURE_SETS[name]]
        return runs + ([lm_runs["lm_fwd"]] if args.init_vectors and lm_runs["lm_fwd"] not in runs else [])

    def features(name: str) -> list[str]:
        sets = [f"model.lm_features=[{', '.join(str(checkpoints[n]) for n in FEATURE_SETS[name])}]",
                f"model.lm_features_layers={args.lm_layers}"]
        big = name != "word" or args.lm_layers == "all"     # all layers: three times the columns kept
        if args.init_vectors:
            sets += [f"model.init_from={checkpoints['lm_fwd']}", "model.init_layers=0", f"model.embedding_dim={LM_SIZE}"]
        if args.ema_decay is not None:
            sets.append(f"train.ema_decay={args.ema_decay}")
        return sets + ([f"model.lm_features_cache_mb={FEATURE_CACHE_MB}"] if big else [])

    variant = ("_mix" if args.lm_layers == "all" else "") + ("_vec" if args.init_vectors else "") + \
        ("_ema" if args.ema_decay is not None else "")
    jobs: dict[str, tuple[list[str], Callable[[], None]]] = {}

    def job(name: str, deps: list[str], config: str, sets: list[str], minutes: float,
            key: str | None = None, *eval_args: str) -> None:
        def work() -> None:
            run = bench.train(name, config, sets, minutes)
            if key:
                results[key] = bench.evaluate(run, *eval_args)
        jobs[name] = (deps, work)

    def more(kind: str, d: str, config: str, data: list[str], minutes: float, per_minute: float, warmup: int) -> None:
        """``{kind}_{d}`` trained ``minutes`` longer: from its checkpoint, a fresh cosine at half the peak rate."""
        if minutes > 0:
            job(f"{kind}_{d}_more", [f"{kind}_{d}"], config,
                [f"model.init_from={args.out / f'{kind}_{d}' / 'best.pt'}", *data, "train.lr=0.001",
                 f"train.warmup_steps={warmup}", f"train.max_steps={max(warmup + 1, int(per_minute * minutes))}"],
                minutes)

    for d, reverse in (("fwd", "false"), ("bwd", "true")):
        word_data = [f"data.train={text}", *wiki, f"data.reverse={reverse}",
                     *([f"model.embedding_dim={LM_SIZE}", f"model.hidden_size={LM_SIZE}"] if args.quick else [])]
        job(f"lm_{d}", [], "configs/lm_wikitext2.yaml", [*word_data, f"train.max_steps={steps}"], args.pretrain_minutes)
        more("lm", d, "configs/lm_wikitext2.yaml", word_data, args.more_pretrain_minutes, LM_STEPS_PER_MINUTE, 100)
        if char_lms:
            char_data = [f"data.train={text}", f"data.valid={WIKI / 'valid.txt'}", f"data.reverse={reverse}",
                         *(["model.hidden_size=64"] if args.quick else [])]
            quick = ["train.max_steps=20", "train.warmup_steps=0"] if args.quick else []
            job(f"clm_{d}", [], "configs/lm_char_flair.yaml", [*char_data, *quick], args.char_pretrain_minutes)
            more("clm", d, "configs/lm_char_flair.yaml", char_data, args.more_char_pretrain_minutes,
                 CLM_STEPS_PER_MINUTE, 50)
    ulmfit = "sentiment" in args.stages and not args.no_ulmfit
    dev = ("--data", str(RT / "dev.tsv"))
    if ulmfit:
        train_text, valid_text = task_text(args.out)
        for d, reverse in (("fwd", "false"), ("bwd", "true")):
            job(f"lm_{d}_rt", [lm_runs[f"lm_{d}"]], "configs/lm_wikitext2.yaml",
                [f"model.init_from={checkpoints[f'lm_{d}']}", f"data.train={train_text}", f"data.valid={valid_text}",
                 "data.test=null", f"data.reverse={reverse}", "train.lr_schedule=slanted_triangular",
                 "train.warmup_steps=0", "train.max_steps=400", "train.eval_every=100",
                 *([f"model.embedding_dim={LM_SIZE}", f"model.hidden_size={LM_SIZE}"] if args.quick else [])],
                args.finetune_minutes)
    if "upos" in args.stages:
        for name in args.upos_features:
            job(f"upos_features{SUFFIX[name]}{variant}", needs(name), "configs/tagger_upos.yaml", features(name),
                args.upos_minutes, f"UPOS test accuracy, {name} LM features{variant}", "--data", str(EWT / "en_ewt-ud-test.conllu"))
    if ulmfit:
        job("sentiment_ulmfit", ["lm_fwd_rt", "lm_bwd_rt"], "configs/sentiment.yaml",
            [f"model.init_from={tuned['fwd']}", f"model.init_from_backward={tuned['bwd']}",
             f"model.embedding_dim={LM_SIZE}", f"model.hidden_size={LM_SIZE}", "model.num_layers=2",
             "train.lr_schedule=slanted_triangular", "train.max_steps=1200", "train.layer_lr_decay=0.38",
             "train.unfreeze_every=170", "train.early_stopping=null", "train.lr=0.01", "model.word_dropout=0.1"],
            args.task_minutes,   # 1,200 steps fit the 10 minutes at one thread; chosen on dev among 3 settings
            "rt-polarity dev accuracy, ULMFiT", *dev)
    if "sentiment" in args.stages:
        for name in args.sentiment_features:
            job(f"sentiment_features{SUFFIX[name]}{variant}", needs(name), "configs/sentiment.yaml",
                features(name), args.task_minutes, f"rt-polarity dev accuracy, {name} LM features{variant}", *dev)
    if "ner" in args.stages:
        test = ("--data", str(NER_TEST))
        for name in args.features:
            job(f"ner_features{SUFFIX[name]}{variant}", needs(name), "configs/tagger_ner.yaml", features(name),
                args.task_minutes, f"UNER test span F1, {name} LM features{variant}", *test)
        job("ner_shipped", [], "configs/tagger_ner.yaml", [], args.task_minutes, "UNER test span F1, shipped", *test)
    if "sentiment" in args.stages:
        job("sentiment_shipped", [], "configs/sentiment.yaml", [], args.task_minutes,
            "rt-polarity dev accuracy, shipped", *dev)
    if "upos" in args.stages and args.upos_shipped:
        job("upos_shipped", [], "configs/tagger_upos.yaml", [], args.upos_minutes,
            "UPOS test accuracy, shipped", "--data", str(EWT / "en_ewt-ud-test.conllu"))
    # the LMs first (everything else waits for them), then the longest runs
    order = ["lm_fwd", "lm_bwd", "lm_fwd_more", "lm_bwd_more", "clm_fwd", "clm_bwd", "clm_fwd_more", "clm_bwd_more", *(f"upos_features{SUFFIX[n]}{variant}" for n in args.upos_features),
             "lm_fwd_rt", "lm_bwd_rt"]
    jobs = {n: jobs[n] for n in order + [n for n in jobs if n not in order] if n in jobs}
    run_jobs(jobs, args.lanes)

    (args.out / "results.json").write_text(json.dumps({"results": results, "minutes": bench.minutes}, indent=1))
    print(f"\ntransfer from pretrained LMs; CPU {cpu_description()}; {args.threads} thread(s) per run, "
          f"{args.lanes} runs at once" + ("  (--quick: not a result)" if args.quick else ""))
    print("| measure | value |")
    print("| --- | --- |")
    for name in sorted(results):
        r = results[name]
        value = r.get("f1") if "F1" in name else r.get("accuracy")
        print(f"| {name} | {100 * value:.2f} |")
    print("\nminutes per run: " + ", ".join(f"{k} {v:.1f}" for k, v in bench.minutes.items()))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
