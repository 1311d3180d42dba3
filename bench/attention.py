"""Attention beyond the encoder-decoder, measured: multi-head attention in the translation
decoder, attention hops in the rt-polarity classifier, and the hierarchical attention
network on UD English-EWT document genres.

- ``translation``: configs/translate_attention.yaml (the peer toolkits' shared Multi30k
  model) for an equal ``--seconds`` of training, fp32, each seed with one head and with
  ``--heads``: BLEU on test_2016_flickr (beam 5) and training tokens/s (the median of the
  logged intervals after the first).
- ``sentiment``: configs/sentiment.yaml (max pooling) against attention pooling. The hops
  and penalty are chosen on dev among ``--settings`` (seed 1), then the chosen setting and
  the shipped config are trained with two new seeds; dev accuracy, and ``predict
  --attention`` on five dev sentences.
- ``genre``: configs/doc_genre_ewt.yaml (hierarchical) against the flat classifier
  (attention pooling over the document's words in one sequence), the same minutes and
  seeds, and the majority class; test accuracy and macro-F1.

``all`` runs the three in two lanes side by side (translation in one, the rest in the
other), each run with ``--threads`` threads. Prints the CPU and a table.

    python bench/attention.py all [--threads 1] [--seconds 720] [--minutes 4]
    python bench/attention.py translation [--seconds 720] [--seeds 1 2] [--heads 4]
    python bench/attention.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MT = DATA / "multi30k"
RT = DATA / "rt-polarity"
EWT = DATA / "ud-english-ewt"
OUT = ROOT / "bench" / "out" / "attention"
SENTIMENT_SETTINGS = ["1:0", "4:0", "4:0.3"]        # hops:penalty tried on dev


class Runs:
    def __init__(self, out: Path, threads: int, quick: bool):
        self.out, self.threads, self.quick = out, threads, quick
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def train(self, name: str, config: str, sets: list[str], seconds: float) -> Path:
        """``rnnkit train`` (unless its folder has finished already); the run folder."""
        run = self.out / name
        if (run / "last.pt").exists() and (run / "best.pt").exists():
            self.say(f"{name}: reusing {run}")
            return run
        args = [f"run_dir={run}", f"train.max_time={5 if self.quick else seconds}",
                f"train.num_threads={self.threads}", *sets]
        if self.quick:
            args += ["train.max_steps=4", "train.eval_every=2", "train.log_every=1"]
        cmd = [sys.executable, "-m", "rnnkit", "train", str(ROOT / config), *[x for s in args for x in ("--set", s)]]
        self.say("$ rnnkit train " + " ".join(cmd[4:]))
        run.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.out / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
        self.say(f"{name}: {(time.perf_counter() - start) / 60:.1f} min")
        return run

    def evaluate(self, run: Path, *args: str) -> dict:
        cmd = [sys.executable, "-m", "rnnkit", "eval", str(run / "best.pt"), *args, "--json",
               "--batch-size", "64"]
        res = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(self.threads)})
        return json.loads(res.stdout.strip().splitlines()[-1])


def tokens_per_s(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    rates = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")] or [r["tokens_per_s"] for r in rows]
    return statistics.median(rates)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def translation(runs: Runs, args) -> list[str]:
    rows, results = [], {}
    for heads in (1, args.heads):
        for seed in args.seeds:
            name = f"mt_h{heads}_s{seed}"
            run = runs.train(name, "configs/translate_attention.yaml",
                             [f"seed={seed}", f"model.decoder.attention_heads={heads}", "train.precision=fp32"],
                             args.seconds)
            bleu = runs.evaluate(run, "--src", str(MT / "test_2016_flickr.en"), "--ref",
                                 str(MT / "test_2016_flickr.fr"), "--beam", "5")["bleu"]
            results[(heads, seed)] = (bleu, tokens_per_s(run))
            runs.say(f"{name}: BLEU {bleu:.2f}, {results[(heads, seed)][1]:,.0f} tokens/s")
    for heads in (1, args.heads):
        b = [results[(heads, s)][0] for s in args.seeds]
        t = [results[(heads, s)][1] for s in args.seeds]
        rows.append(f"| Multi30k en-fr, {heads} head{'s' if heads > 1 else ''}, {args.seconds:g} s | BLEU "
                    f"{' / '.join(f'{x:.2f}' for x in b)} (mean {mean(b):.2f}) | tokens/s "
                    f"{' / '.join(f'{x:,.0f}' for x in t)} (mean {mean(t):,.0f}) |")
    gain = mean([results[(args.heads, s)][0] for s in args.seeds]) - mean([results[(1, s)][0] for s in args.seeds])
    speed = mean([results[(args.heads, s)][1] for s in args.seeds]) / mean([results[(1, s)][1] for s in args.seeds])
    rows.append(f"| {args.heads} heads against 1 | {gain:+.2f} BLEU (goal >= +0.5) | tokens/s {speed:.3f}x "
                f"(goal >= 0.90x) |")
    return rows


def sentiment(runs: Runs, args) -> list[str]:
    dev = ["--data", str(RT / "dev.tsv")]
    chosen, best = None, -1.0
    rows = []
    for setting in args.settings:
        hops, penalty = setting.split(":")
        run = runs.train(f"rt_att_h{hops}_p{penalty}_s1", "configs/sentiment.yaml",
                         ["seed=1", "model.pooling=attention", f"model.attention_hops={hops}",
                          f"train.attention_penalty={penalty}"], args.minutes * 60)
        acc = runs.evaluate(run, *dev)["accuracy"] * 100
        runs.say(f"sentiment hops {hops}, penalty {penalty}: dev {acc:.2f}")
        rows.append(f"| rt-polarity choice: attention, {hops} hop{'s' if hops != '1' else ''}, penalty {penalty}, "
                    f"seed 1 | dev accuracy {acc:.2f} | |")
        if acc > best:
            chosen, best = (hops, penalty), acc
    finals = {}
    for label, sets in (("shipped (max pooling)", []),
                        (f"attention, {chosen[0]} hop{'s' if chosen[0] != '1' else ''}, penalty {chosen[1]}",
                         ["model.pooling=attention", f"model.attention_hops={chosen[0]}",
                          f"train.attention_penalty={chosen[1]}"])):
        accs = []
        for seed in (11, 12):
            tag = "max" if not sets else f"att_h{chosen[0]}_p{chosen[1]}"
            run = runs.train(f"rt_{tag}_s{seed}", "configs/sentiment.yaml", [f"seed={seed}", *sets],
                             args.minutes * 60)
            accs.append(runs.evaluate(run, *dev)["accuracy"] * 100)
            finals[label] = (run, accs)
        rows.append(f"| rt-polarity, {label}, seeds 11 and 12, {args.minutes:g} min | dev accuracy "
                    f"{' / '.join(f'{a:.2f}' for a in accs)} (mean {mean(accs):.2f}) | |")
    run = finals[f"attention, {chosen[0]} hop{'s' if chosen[0] != '1' else ''}, penalty {chosen[1]}"][0]
    sentences = [line.split("\t", 1)[1] for line in (RT / "dev.tsv").read_text(encoding="utf-8").splitlines()[:5]]
    flags = ["--attention"] + (["--hops"] if chosen[0] != "1" else [])
    shown = subprocess.run([sys.executable, "-m", "rnnkit", "predict", str(run / "best.pt"), *flags,
                            "--attention-html", str(runs.out / "attention.html")],
                           input="\n".join(sentences) + "\n", cwd=ROOT, capture_output=True, text=True, check=True)
    runs.say("predict --attention on five dev sentences:\n" + shown.stdout)
    return rows


def genre(runs: Runs, args) -> list[str]:
    from rnnkit.data.documents import read_documents
    from rnnkit.tasks.classifier_text import classification_scores

    test = str(EWT / "en_ewt-ud-test.conllu")
    train_labels = [d.label for d in read_documents(str(EWT / "en_ewt-ud-train.conllu"), "newdoc_prefix")]
    test_labels = [d.label for d in read_documents(test, "newdoc_prefix")]
    labels = sorted(set(train_labels))
    majority = Counter(train_labels).most_common(1)[0][0]
    base = classification_scores([labels.index(x) for x in test_labels], [labels.index(majority)] * len(test_labels),
                                 labels)
    rows = [f"| EWT genre, majority class ({majority}) | test accuracy {base['accuracy'] * 100:.2f}, macro-F1 "
            f"{base['macro_f1'] * 100:.2f} | |"]
    for name, sets in (("hierarchical", []), ("flat", ["model.hierarchical=false", "model.pooling=attention"])):
        accs, f1s = [], []
        for seed in args.genre_seeds:
            run = runs.train(f"genre_{name}_s{seed}", "configs/doc_genre_ewt.yaml", [f"seed={seed}", *sets],
                             args.minutes * 60)
            r = runs.evaluate(run, "--data", test)
            accs.append(r["accuracy"] * 100)
            f1s.append(r["macro_f1"] * 100)
            runs.say(f"genre {name} seed {seed}: test accuracy {accs[-1]:.2f}, macro-F1 {f1s[-1]:.2f}")
        rows.append(f"| EWT genre, {name}, {args.minutes:g} min, seeds {', '.join(map(str, args.genre_seeds))} | "
                    f"test accuracy {' / '.join(f'{a:.2f}' for a in accs)} (mean {mean(accs):.2f}), macro-F1 "
                    f"{' / '.join(f'{f:.2f}' for f in f1s)} (mean {mean(f1s):.2f}) | |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", choices=["all", "translation", "sentiment", "genre"], default="all")
    ap.add_argument("--seconds", type=float, default=720.0, help="translation: each run's train.max_time")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="translation seeds")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=4.0, help="sentiment and genre: each run's minutes")
    ap.add_argument("--settings", nargs="+", default=SENTIMENT_SETTINGS, help="sentiment: hops:penalty on dev")
    ap.add_argument("--genre-seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--threads", type=int, default=None, help="each run's threads (default: all; 'all' halves them)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="a few steps of each on the bundled samples: the plumbing")
    args = ap.parse_args()
    if args.quick:
        return quick()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (Multi30k, rt-polarity and UD English-EWT are read from there)")
        return 0
    cpus = len(os.sched_getaffinity(0))
    threads = args.threads or (max(1, cpus // 2) if args.what == "all" else cpus)
    runs = Runs(args.out, threads, False)
    print(f"CPU: {cpu_description()}; {threads} thread(s) per run"
          + ("; two runs side by side" if args.what == "all" else ""), flush=True)
    jobs = {"translation": translation, "sentiment": sentiment, "genre": genre}
    start = time.perf_counter()
    if args.what == "all":
        results: dict[str, list[str]] = {}

        def lane(names: list[str]) -> None:
            for n in names:
                results[n] = jobs[n](runs, args)

        lanes = [threading.Thread(target=lane, args=(names,)) for names in (["translation"], ["genre", "sentiment"])]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        rows = [r for n in ("translation", "sentiment", "genre") for r in results.get(n, [])]
    else:
        rows = jobs[args.what](runs, args)
    print(f"\nCPU: {cpu_description()}; {threads} thread(s) per run; {(time.perf_counter() - start) / 60:.1f} min wall")
    print("| measure | result | speed |\n| --- | --- | --- |")
    print("\n".join(rows))
    return 0


def quick() -> int:
    """Each comparison's plumbing on the bundled samples: a translation with 2 heads, a
    classifier with 2 hops and a penalty, a hierarchical document classifier."""
    import tempfile

    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="rnnkit-attention-"))
    parallel = ROOT / "data" / "parallel"
    lines = ["pos\tbright calm water", "neg\tgrey storm water", "pos\ta calm bright day", "neg\tcold grey wind"] * 5
    (tmp / "s.tsv").write_text("\n".join(lines) + "\n")
    (tmp / "d.jsonl").write_text("".join(json.dumps({"label": x.split("\t")[0], "sentences": [x.split("\t")[1]] * 2})
                                         + "\n" for x in lines))
    configs = {
        "mt": {"task": "translation", "data": {"train_src": str(parallel / "train.en"),
                                               "train_tgt": str(parallel / "train.fr"),
                                               "valid_src": str(parallel / "valid.en"),
                                               "valid_tgt": str(parallel / "valid.fr")},
               "model": {"embedding_dim": 16, "encoder": {"hidden_size": 16},
                         "decoder": {"hidden_size": 32, "attention_heads": 2}}},
        "hops": {"task": "classification", "data": {"train": str(tmp / "s.tsv"), "valid": str(tmp / "s.tsv")},
                 "model": {"embedding_dim": 8, "hidden_size": 8, "pooling": "attention", "attention_hops": 2},
                 "train": {"attention_penalty": 0.1}},
        "han": {"task": "classification", "data": {"format": "documents", "train": str(tmp / "d.jsonl"),
                                                   "valid": str(tmp / "d.jsonl")},
                "model": {"embedding_dim": 8, "hidden_size": 8, "hierarchical": True}},
    }
    for name, cfg in configs.items():
        cfg["run_dir"] = str(tmp / name)
        cfg.setdefault("train", {}).update(max_steps=4, eval_every=2, log_every=1)
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "rnnkit", "train", str(path)], cwd=ROOT, check=True,
                       capture_output=True)
        print(f"{name}: trained", flush=True)
    out = subprocess.run([sys.executable, "-m", "rnnkit", "predict", str(tmp / "han" / "best.pt"), "--attention"],
                         input=(tmp / "d.jsonl").read_text().splitlines()[0] + "\n", cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    print("hierarchical predict --attention: " + out.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
