"""Corpora of any size: preparing, the first training step and training memory as the corpus grows.

Builds its corpora by repeating ../shared/data/multi30k (en-fr) and ../shared/data/wikitext-2
(train) into bench/out/scale, then measures, one run after the other:

- translation (configs/translate_attention.yaml) at 29,000 / 1,015,000 / 10,005,000 pairs:
  `rnnkit prepare` with 1 and with 2 workers (wall time, peak resident memory of the whole
  process tree, sampled every 50 ms), then `rnnkit train` for --steps steps on the store:
  seconds from launch to the first logged step, and the process's peak RSS (its maxrss);
- two ranks (torchrun --nproc-per-node 2) on the plain and the largest store: each rank's
  peak proportional set size (PSS, /proc/PID/smaps_rollup: shared pages split between the ranks);
- a word language model on WikiText-2 train and on it repeated --lm-repeats times (prepare,
  first step, peak RSS over --steps steps);
- OpenNMT-py 3.5.1 (bench/out/peers-venv, made by ../shared/bench/peers/install_peers.sh) on
  the 1,015,000 pairs: build its vocabulary, then train 20 steps: time to its first step, peak
  RSS; beside rnnkit doing the same from nothing (prepare inside `rnnkit train`).

    python bench/scale.py [--repeats 1,35,345] [--lm-repeats 50] [--steps 200] [--rounds 3] [--skip-onmt]

Training runs alternate between the corpora, ``--rounds`` times, and the medians are compared:
the same run's peak RSS varies by several per cent from one time to the next.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "scale"
BIN = Path(sys.executable).parent
PEERS = ROOT / "bench" / "out" / "peers-venv" / "bin"


def repeated(name: str, sources: list[Path], repeats: int) -> list[Path]:
    """``repeats`` copies of each source end to end (made once)."""
    out = []
    for src in sources:
        dst = OUT / "corpora" / f"{name}{repeats}{src.suffix}"
        if not dst.exists() or dst.stat().st_size != src.stat().st_size * repeats:
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = src.read_bytes()
            with open(f"{dst}.tmp", "wb") as fh:
                for _ in range(repeats):
                    fh.write(data)
            os.replace(f"{dst}.tmp", dst)
        out.append(dst)
    return out


# ---------------------------------------------------------------------- measuring a process tree
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def _status_kb(pid: int, key: str, file: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{file}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measured(cmd: list[str], env: dict | None = None, first_step: Path | None = None,
             ranks: bool = False, timeout: float = 3600) -> dict:
    """Run ``cmd``; its wall time, peak RSS of the whole tree (sampled), its own maxrss, the
    seconds until ``first_step`` (a metrics.jsonl) holds a train record, and with ``ranks``
    the peak PSS of each ``rnnkit train`` process in the tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    peak_tree, first, pss = 0, None, {}
    out_chunks = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        tree = _tree(proc.pid)
        peak_tree = max(peak_tree, sum(_status_kb(p, "VmRSS:") for p in tree))
        if ranks:
            for p in tree:
                try:
                    cmdline = open(f"/proc/{p}/cmdline", "rb").read()
                except OSError:
                    continue
                if b"rnnkit" in cmdline and b"train" in cmdline and b"torchrun" not in cmdline:
                    pss[p] = max(pss.get(p, 0), _status_kb(p, "Pss:", "smaps_rollup"))
        if first is None and first_step is not None and first_step.exists():
            if any('"kind": "train"' in ln for ln in first_step.read_text().splitlines()):
                first = time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    reader.join(5)
    wall = time.perf_counter() - start
    output = (out_chunks[0] if out_chunks else b"").decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"wall": wall, "tree_gb": peak_tree / 1e6, "first_step": first,
            "pss_gb": [v / 1e6 for v in pss.values()], "output": output}


def maxrss_gb(cmd: list[str], env: dict | None = None, first_step: Path | None = None) -> dict:
    """``measured`` plus the process's own peak RSS from /usr/bin/time."""
    timing = OUT / "time.txt"
    res = measured(["/usr/bin/time", "-f", "%M", "-o", str(timing), *cmd], env, first_step)
    res["maxrss_gb"] = int(timing.read_text().split()[-1]) / 1e6
    return res


# ---------------------------------------------------------------------- runs
def cache_env(name: str, fresh: bool = False) -> dict:
    folder = OUT / "cache" / name
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    return {"RNNKIT_CACHE": str(folder), "OMP_NUM_THREADS": "2"}


def translation_sets(en: Path, fr: Path, run: str, steps: int, repeats: int = 1) -> list[str]:
    """``--set`` options: the corpus, the run, and ``min_freq`` 2 per copy, so that the vocabulary
    (and so the model) is the plain corpus's and only the data path differs."""
    return ["--set", f"data.train_src={en}", "--set", f"data.train_tgt={fr}", "--set", f"run_dir={OUT / 'runs' / run}",
            "--set", f"data.min_freq={2 * repeats}",
            "--set", f"train.max_steps={steps}", "--set", "train.log_every=1", "--set", "train.max_time=null",
            "--set", "train.eval_every=1000000"]


def train(config: str, sets: list[str], env: dict, ranks: int = 1) -> dict:
    run_dir = Path(next(s.split("=", 1)[1] for s in sets if s.startswith("run_dir=")))
    shutil.rmtree(run_dir, ignore_errors=True)
    if ranks == 1:
        res = maxrss_gb([str(BIN / "rnnkit"), "train", config, *sets], env, run_dir / "metrics.jsonl")
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", "-m", "rnnkit", "train", config,
               *sets]
        res = measured(cmd, {**env, "OMP_NUM_THREADS": "1"}, run_dir / "metrics.jsonl", ranks=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res["tokens_per_s"] = sum(r["tokens"] for r in rows if r["kind"] == "train" and r["step"] > 10) / max(
        1e-9, max(r["elapsed"] for r in rows if r["kind"] == "train") - next(
            r["elapsed"] for r in rows if r["kind"] == "train" and r["step"] == 10))
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


def prepare(config: str, sets: list[str], name: str, workers: int) -> dict:
    return measured([str(BIN / "rnnkit"), "prepare", config, *sets, "--workers", str(workers)],
                    cache_env(name, fresh=True))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _row(name: str, one: dict | None, two: dict | None, runs: list[dict], base: list[dict]) -> list[str]:
    """A table row: preparing with 1 and 2 workers, then the median of the training runs (each
    run's peak RSS listed: the same run varies by several per cent from one time to the next)."""
    rss = [r["maxrss_gb"] for r in runs]
    ratio = _median(rss) / _median([r["maxrss_gb"] for r in base])
    speedup = f" ({one['wall'] / two['wall']:.2f}x)" if one and two else ""
    return [name, f"{one['wall']:.1f} s / {one['tree_gb']:.2f} GB" if one else "-",
            f"{two['wall']:.1f} s / {two['tree_gb']:.2f} GB{speedup}" if two else "-",
            f"{_median([r['first_step'] for r in runs]):.1f} s",
            f"{_median(rss):.2f} GB ({', '.join(f'{v:.2f}' for v in rss)}): {ratio:.3f}x",
            f"{_median([r['tokens_per_s'] for r in runs]):,.0f}"]


def translation(repeats: list[int], steps: int, rows: list[list[str]], ranks: int, rounds: int) -> None:
    """Prepare each corpus, then train on them in alternation, ``rounds`` times."""
    config = str(ROOT / "configs" / "translate_attention.yaml")
    prepared, runs = {}, {r: [] for r in repeats}
    for r in repeats:
        en, fr = repeated("m30k", [DATA / "multi30k" / "train.en", DATA / "multi30k" / "train.fr"], r)
        sets = translation_sets(en, fr, f"tr{r}", steps, r)
        prepared[r] = (en, fr, sets, prepare(config, sets, f"tr{r}-w1", 1), prepare(config, sets, f"tr{r}-w2", 2))
        print(f"prepared {29000 * r:,} pairs: 1 worker {prepared[r][3]['wall']:.1f} s, "
              f"2 workers {prepared[r][4]['wall']:.1f} s", flush=True)
    for k in range(rounds):
        for r in repeats:
            if k and r not in (repeats[0], repeats[-1]):     # the sizes between: one run
                continue
            runs[r].append(train(config, prepared[r][2], cache_env(f"tr{r}-w2")))
            print(f"round {k + 1}, {29000 * r:,} pairs: {runs[r][-1]['maxrss_gb']:.3f} GB", flush=True)
    for r in repeats:
        rows.append(_row(f"translation, {29000 * r:,} pairs", prepared[r][3], prepared[r][4], runs[r],
                         runs[repeats[0]]))
        print(" | ".join(rows[-1]), flush=True)
    if ranks > 1:
        ends = (repeats[0], repeats[-1])
        pss = {r: [] for r in ends}
        for k in range(rounds):
            for r in ends:
                en, fr = prepared[r][:2]
                res = train(config, translation_sets(en, fr, f"tr{r}-ranks", 40, r), cache_env(f"tr{r}-w2"),
                            ranks=ranks)
                pss[r].append(max(res["pss_gb"]))
        for r in ends:
            ratio = _median(pss[r]) / _median(pss[ends[0]])
            rows.append([f"  {ranks} ranks, {29000 * r:,} pairs", "", "", "",
                         f"largest rank PSS {_median(pss[r]):.2f} GB ({', '.join(f'{v:.2f}' for v in pss[r])}): "
                         f"{ratio:.3f}x", ""])
            print(" | ".join(rows[-1]), flush=True)


def language_model(repeats: int, steps: int, rows: list[list[str]], rounds: int) -> None:
    config = str(ROOT / "bench" / "scale_lm.yaml")
    prepared, runs = {}, {1: [], repeats: []}
    for r in (1, repeats):
        (train_file,) = repeated("wt2", [DATA / "wikitext-2" / "train.txt"], r)
        sets = ["--set", f"data.train={train_file}", "--set", f"data.valid={DATA / 'wikitext-2' / 'valid.txt'}",
                "--set", f"run_dir={OUT / 'runs' / f'lm{r}'}", "--set", f"train.max_steps={steps}",
                "--set", "train.log_every=1", "--set", "train.eval_every=1000000"]
        prepared[r] = (sets, prepare(config, sets, f"lm{r}-w1", 1) if r == 1 else None,
                       prepare(config, sets, f"lm{r}-w2", 2))
    for k in range(rounds):
        for r in (1, repeats):
            runs[r].append(train(config, prepared[r][0], cache_env(f"lm{r}-w2")))
            print(f"round {k + 1}, LM x{r}: {runs[r][-1]['maxrss_gb']:.3f} GB", flush=True)
    for r in (1, repeats):
        rows.append(_row(f"word LM, {2_088_628 * r / 1e6:,.1f} M tokens", prepared[r][1], prepared[r][2],
                         runs[r], runs[1]))
        print(" | ".join(rows[-1]), flush=True)


def opennmt(rows: list[list[str]]) -> None:
    """OpenNMT-py on the 1,015,000 pairs: build its vocabulary, train 20 steps; rnnkit from nothing beside it."""
    if not (PEERS / "onmt_train").exists():
        print("OpenNMT-py is not installed (bash ../shared/bench/peers/install_peers.sh bench/out/peers-venv); skipped")
        return
    en, fr = repeated("m30k", [DATA / "multi30k" / "train.en", DATA / "multi30k" / "train.fr"], 35)
    work = OUT / "onmt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = (ROOT.parent / "shared" / "bench" / "peers" / "onmt_m30k_enfr.yaml").read_text()
    text = text.replace("PEERRUNS/onmt", str(work)).replace("DATA/multi30k/train.en", str(en)) \
        .replace("DATA/multi30k/train.fr", str(fr)).replace("DATA", str(DATA)).replace("MAXUPDATES", "20") \
        .replace("save_checkpoint_steps: 50", "save_checkpoint_steps: 1000")
    cfg = work / "train.yaml"
    cfg.write_text(text + "\nreport_every: 1\n")
    env = {"OMP_NUM_THREADS": "2", "PATH": f"{PEERS}:{os.environ['PATH']}"}
    vocab = maxrss_gb([str(PEERS / "onmt_build_vocab"), "-config", str(cfg), "-n_sample", "-1"], env)
    for f in ("vocab.src", "vocab.tgt"):   # its reader rejects whitespace-like tokens its builder writes
        p = work / f
        p.write_text("".join(ln + "\n" for ln in p.read_text(encoding="utf-8").split("\n")[:-1]
                             if len(ln.split(None, 1)) == 2), encoding="utf-8")
    start = time.perf_counter()
    trained = maxrss_gb([str(PEERS / "onmt_train"), "-config", str(cfg)], env)
    first = _onmt_first_step(trained["output"], start)
    rows.append(["OpenNMT-py, 1,015,000 pairs", f"vocab {vocab['wall']:.1f} s / {vocab['maxrss_gb']:.2f} GB", "",
                 f"{vocab['wall'] + first:.1f} s (vocab + {first:.1f})" if first else "?",
                 f"{trained['maxrss_gb']:.2f} GB (20 steps)", ""])
    print(" | ".join(rows[-1]), flush=True)
    config = str(ROOT / "configs" / "translate_attention.yaml")
    ours = train(config, translation_sets(en, fr, "tr35-fresh", 20), cache_env("tr35-fresh", fresh=True))
    rows.append(["rnnkit, 1,015,000 pairs, from nothing", "(prepared inside train)", "",
                 f"{ours['first_step']:.1f} s", f"{ours['maxrss_gb']:.2f} GB (20 steps)", ""])
    print(" | ".join(rows[-1]), flush=True)


def _onmt_first_step(log: str, start: float) -> float | None:
    """Seconds from the start of onmt_train to its 'Step 1/' report (from its log's clock times)."""
    import re
    stamps = re.findall(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ INFO\] (.*)", log)
    if not stamps:
        return None
    t0 = time.mktime(time.strptime(stamps[0][0], "%Y-%m-%d %H:%M:%S"))
    for when, what in stamps:
        if re.match(r"Step\s+1/", what):
            return time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) - t0
    return None


def main() -> None:
    from bench.machine import cpu_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", default="1,35,345", help="Multi30k copies per translation corpus")
    ap.add_argument("--lm-repeats", type=int, default=50, help="WikiText-2 train copies (0: no LM runs)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ranks", type=int, default=2, help="torchrun ranks for the PSS runs (1: none)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating training runs per corpus (medians reported)")
    ap.add_argument("--skip-onmt", action="store_true")
    args = ap.parse_args()
    if not (DATA / "multi30k" / "train.en").exists():
        raise SystemExit(f"skipped: {DATA} is absent (the benchmark reads multi30k and wikitext-2 from there)")
    print(f"machine: CPU {cpu_description()}, {os.cpu_count()} cores", flush=True)
    rows: list[list[str]] = []
    translation([int(r) for r in args.repeats.split(",")], args.steps, rows, args.ranks, args.rounds)
    if args.lm_repeats:
        language_model(args.lm_repeats, args.steps, rows, args.rounds)
    if not args.skip_onmt:
        opennmt(rows)
    head = ["corpus", "prepare, 1 worker (time / peak RSS)", "prepare, 2 workers", "first step",
            f"training peak RSS, median of {args.rounds} ({args.steps} steps; ratio to the plain corpus)",
            "tokens/s"]
    print(f"\nmachine: CPU {cpu_description()}, {os.cpu_count()} cores")
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
