"""Training and decoding speed of the peer toolkits (Joey NMT, OpenNMT-py) beside rnnkit's, same model.

Uses ../shared/bench/peers: installs both peers into their own venv (bench/out/peers-venv)
when missing, trains each for --steps updates on Multi30k en->fr with the shared model
config, and reads steady-state target tokens/s from the logs (Joey NMT's with the shared
throughput.py). Then trains rnnkit's configs/translate_attention.yaml (the same model)
for the same steps. Then each decodes test_2016_flickr with beam 5 (batch 64 sentences,
length penalty alpha 1.0, at most 100 target tokens) with the model it trained, timed as a
whole process (start-up and model loading included) and scored with sacreBLEU. Peak
memory is each process's maximum resident set size.

rnnkit trains once per ``--precision`` (fp32, and bf16 where the CPU multiplies bf16 natively)
and decodes its fp32-trained model once per arithmetic (fp32, ``--precision bf16``, ``--int8``)
and from its export (fp32 and int8, on onnxruntime); each training reports its validation
loss at the last step. A last table times the same decodings with start-up and loading
excluded (checkpoint fp32 and bf16 against the export), with whether each gives the
export's fp32 output line for line. ``--peers onmt`` leaves Joey NMT
out (it has been the slower peer by a factor of two in every run so far).

    python bench/peers.py [--steps 220] [--peers onmt,joey] [--precision fp32,bf16]
    python bench/peers.py --decode-only --onmt-model M.pt --joey-config J.yaml --rnnkit-checkpoint C.pt

A model trained for a few hundred steps decodes differently from a converged one (more
repetition, other lengths); ``--decode-only`` times decoding with models trained longer,
for instance by ../shared/bench/peers/run_quality.sh and ``rnnkit train``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
PEERS = SHARED / "bench" / "peers"
OUT = ROOT / "bench" / "out"


def timed(cmd: list[str] | str, log: Path, cwd: Path,
          env: dict | None = None) -> tuple[int, float | None, float | None]:
    """Run under /usr/bin/time; returns the exit code, the peak RSS in GB and the wall time in s."""
    timing = log.with_suffix(".time")
    shell = cmd if isinstance(cmd, str) else " ".join(cmd)
    with log.open("w") as fh:
        rc = subprocess.call(f"/usr/bin/time -v -o {timing} {shell}", shell=True, cwd=cwd, stdout=fh,
                             stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    text = timing.read_text() if timing.exists() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    seconds = None if not wall else int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return rc, (int(rss.group(1)) / 1e6 if rss else None), seconds


def decode(name: str, shell: str, hyp: Path, log: Path, cwd: Path) -> dict:
    """Time one beam-5 decoding of test_2016_flickr and score it."""
    import sacrebleu

    test = SHARED / "data" / "multi30k" / "test_2016_flickr"
    # OpenNMT-py 3.5.1 and Joey NMT 2.3.0 checkpoints hold Python objects that torch >= 2.6
    # refuses by default; they were written here, so the full unpickler is allowed for them
    rc, rss, wall = timed(shell, log, cwd, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    if rc != 0 or not hyp.exists():
        return {"error": f"{name} decoding failed (exit {rc}); see {log}"}
    hyps = hyp.read_text(encoding="utf-8").splitlines()
    refs = (test.with_suffix(".fr")).read_text(encoding="utf-8").splitlines()
    if len(hyps) != len(refs):
        return {"error": f"{name} wrote {len(hyps)} lines for {len(refs)} sentences; see {log}"}
    return {"seconds": wall, "sentences_per_s": len(refs) / wall, "peak_gb": rss,
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}


def peer_config(name: str, work: Path, steps: int) -> Path:
    text = (PEERS / f"{name}_m30k_enfr.yaml").read_text()
    text = text.replace("PEERRUNS", str(work)).replace("DATA", str(SHARED / "data")).replace("MAXUPDATES", str(steps))
    path = work / f"{name}.yaml"
    path.write_text(text)
    return path


def onmt_throughput(log: Path, a: int, b: int) -> dict:
    """Like the shared throughput.py, but tolerant of OpenNMT-py's padded 'Step  20/ 220'."""
    from datetime import datetime

    pat = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) INFO\] Step\s+(\d+)/\s*\d+;.*?bsz:\s*\d+/\s*(\d+)/")
    rows = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = pat.search(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            rows[int(m.group(2))] = (t, int(m.group(3)))
    if a not in rows or b not in rows:
        return {"error": f"steps {a}/{b} not in {log}"}
    steps = sorted(s for s in rows if a < s <= b)
    tokens = sum(rows[s][1] * (s - prev) for prev, s in zip([a] + steps, steps))
    dt = rows[b][0] - rows[a][0]
    return {"s_per_step": dt / (b - a), "tokens_per_s": tokens / dt}


def throughput(kind: str, log: Path, a: int, b: int) -> dict:
    if kind == "onmt":
        return onmt_throughput(log, a, b)
    py = OUT / "peers-venv" / "bin" / "python"
    res = subprocess.run([str(py), str(PEERS / "throughput.py"), kind, str(log), str(a), str(b)],
                         capture_output=True, text=True)
    m = re.search(r"([\d.]+) s/step, (\d+) tgt tok/s", res.stdout)
    if not m:
        return {"error": (res.stdout + res.stderr).strip()[-200:]}
    return {"s_per_step": float(m.group(1)), "tokens_per_s": float(m.group(2))}


PEER_NAMES = {"onmt": "OpenNMT-py 3.5.1", "joey": "Joey NMT 2.3.0"}


def main() -> int:
    from rnnkit.hardware import native_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=220)
    ap.add_argument("--peers", default="onmt,joey", help="which peers to run: onmt, joey or both")
    ap.add_argument("--precision", default="fp32,bf16" if native_bf16() else "fp32",
                    help="rnnkit training precisions (default: fp32, and bf16 on a CPU with native bf16)")
    ap.add_argument("--decode-only", action="store_true", help="skip training; decode with the models named below")
    ap.add_argument("--onmt-model", help="OpenNMT-py checkpoint to decode with (default: the one trained here)")
    ap.add_argument("--joey-config", help="Joey NMT config whose model_dir holds the model to decode with")
    ap.add_argument("--rnnkit-checkpoint", help="rnnkit checkpoint to decode with")
    ap.add_argument("--time-translate", help=argparse.SUPPRESS)          # the child of decode_after_start
    ap.add_argument("--translate-precision", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_translate:
        print(json.dumps(time_translate(args.time_translate, args.translate_precision)))
        return 0
    args.peers = [p for p in args.peers.split(",") if p]
    args.precision = [p for p in args.precision.split(",") if p]
    if not set(args.peers) <= set(PEER_NAMES) or not set(args.precision) <= {"fp32", "bf16"}:
        ap.error("--peers takes onmt and/or joey; --precision fp32 and/or bf16")
    import torch

    from bench.machine import describe
    print(describe(torch.device("cpu")).replace(f"{torch.get_num_threads()} threads", "2 threads"))
    if not (SHARED / "data" / "multi30k").exists() or not PEERS.exists():
        print("skipped: ../shared/data/multi30k or ../shared/bench/peers is absent")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    venv = OUT / "peers-venv"
    if not (venv / "bin" / "onmt_train").exists():
        rc = subprocess.call(["bash", str(PEERS / "install_peers.sh"), str(venv)])
        if rc != 0:
            print("skipped: installing the peers failed (see above)")
            return 0
    work = OUT / "peer-runs"
    (work / "onmt").mkdir(parents=True, exist_ok=True)
    (work / "joey").mkdir(parents=True, exist_ok=True)
    bin_ = venv / "bin"
    results = {} if args.decode_only else train_all(args, work, bin_)
    if results:
        print_training(results, args.steps)
    def given(path: str | None) -> str | None:     # the peers run in another folder
        return str(Path(path).resolve()) if path else None

    models = {"onmt": given(args.onmt_model) or last_onmt_checkpoint(work / "onmt"),
              "joey": given(args.joey_config) or str(peer_config("joey", work, args.steps)),
              "rnnkit": given(args.rnnkit_checkpoint) or str(work / f"rnnkit-{args.precision[0]}" / "last.pt")}
    print_decoding(decode_all(models, args.peers, work, bin_))
    exports = {name: work / f"rnnkit-export-{name}" for name in ("fp32", "int8")}
    print_after_start(decode_after_start(models["rnnkit"], {n: f for n, f in exports.items() if f.is_dir()}))
    return 0


def last_onmt_checkpoint(folder: Path) -> str:
    found = sorted(folder.glob("model_step_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return str(found[-1]) if found else str(folder / "model_step_0.pt")


def decode_all(models: dict[str, str], peers: list[str], work: Path, bin_: Path) -> dict:
    src = SHARED / "data" / "multi30k" / "test_2016_flickr.en"
    out = work / "decode"
    out.mkdir(exist_ok=True)
    commands = {
        "onmt": f"{bin_ / 'onmt_translate'} -model {models['onmt']} -src {src} -output {out / 'onmt.fr'} "
                f"-beam_size 5 -batch_size 64 -batch_type sents -max_length 100 -length_penalty wu -alpha 1.0",
        "joey": f"{bin_ / 'python'} -m joeynmt translate {models['joey']} < {src} > {out / 'joey.fr'}",
    }
    results = {PEER_NAMES[p]: decode(PEER_NAMES[p], commands[p], out / f"{p}.fr", out / f"{p}.log", work)
               for p in peers}
    exports = export_rnnkit(models["rnnkit"], work)
    runs = [(name, models["rnnkit"], option) for name, option in
            (("fp32", ""), ("bf16", " --precision bf16"), ("int8", " --int8"))]
    runs += [(f"export {name}", str(folder), "") for name, folder in exports.items()]
    for name, model, option in runs:
        hyp = out / f"rnnkit-{name.replace(' ', '-')}.fr"
        results[f"rnnkit {name}"] = decode(
            f"rnnkit {name}", f"{sys.executable} -m rnnkit translate {model} --beam 5 --batch-size 64 "
            f"--length-penalty 1.0{option} -i {src} -o {hyp}", hyp, out / f"rnnkit-{name.replace(' ', '-')}.log", ROOT)
    return results


def export_rnnkit(checkpoint: str, work: Path) -> dict[str, Path]:
    """The checkpoint exported in fp32 and int8 (not timed); the folders that worked."""
    folders = {}
    for name, option in (("fp32", []), ("int8", ["--int8"])):
        folder = work / f"rnnkit-export-{name}"
        subprocess.call(["rm", "-rf", str(folder)])
        res = subprocess.run([sys.executable, "-m", "rnnkit", "export", checkpoint, "-o", str(folder), *option],
                             cwd=ROOT, capture_output=True, text=True)
        if res.returncode == 0:
            folders[name] = folder
        else:
            print(f"export {name} failed: {(res.stderr or res.stdout).strip()[-300:]}")
    return folders


def time_translate(model: str, precision: str) -> dict:
    """In this process: load ``model``, then time the beam-5 translation of test_2016_flickr
    (the search's time, start-up and loading excluded); the hypotheses' checksum."""
    import hashlib
    import time

    import rnnkit

    lines = (SHARED / "data" / "multi30k" / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()
    m = rnnkit.load(model, precision=precision)
    start = time.perf_counter()
    out = m.translate(lines, beam=5, batch_size=64, length_penalty=1.0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "sha256": hashlib.sha256("\n".join(out).encode()).hexdigest()}


def decode_after_start(checkpoint: str, exports: dict[str, Path]) -> dict:
    """Decoding time with start-up excluded, each in a fresh process of two threads."""
    runs = {"checkpoint fp32": (checkpoint, "fp32"), "checkpoint bf16": (checkpoint, "bf16")}
    runs.update({f"export {name}": (str(folder), "fp32") for name, folder in exports.items()})
    results = {}
    for name, (model, precision) in runs.items():
        res = subprocess.run([sys.executable, __file__, "--time-translate", model, "--translate-precision", precision],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        try:
            results[name] = json.loads(res.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            results[name] = {"error": (res.stderr or res.stdout).strip()[-300:]}
    return results


def print_after_start(results: dict) -> None:
    print("beam-5 decoding of test_2016_flickr, start-up and loading excluded (one process each, 2 threads):")
    print(f"{'model':<18} {'seconds':>8}  same fp32 output as the export")
    ref = results.get("export fp32", {}).get("sha256")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} error: {r['error']}")
            continue
        print(f"{name:<18} {r['seconds']:>8.2f}  {'yes' if r['sha256'] == ref else 'no'}")
    base = results.get("export fp32", {}).get("seconds")
    for name in ("checkpoint fp32", "checkpoint bf16"):
        if base and "seconds" in results.get(name, {}):
            print(f"time ratio {name} / export fp32: {results[name]['seconds'] / base:.2f}")


def print_decoding(results: dict) -> None:
    print("beam-5 decoding of test_2016_flickr (1,000 sentences), whole process, CPU (OMP_NUM_THREADS=2):")
    print(f"{'toolkit':<18} {'seconds':>8} {'sent/s':>7} {'BLEU':>6} {'peak RSS GB':>12}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} error: {r['error']}")
            continue
        print(f"{name:<18} {r['seconds']:>8.1f} {r['sentences_per_s']:>7.1f} {r['bleu']:>6.1f} "
              f"{r['peak_gb'] or 0:>12.2f}")
    print_ratios(results, "sentences_per_s", "decoding")


def train_all(args, work: Path, bin_: Path) -> dict:
    results = {}
    if "onmt" in args.peers:
        for old in (work / "onmt").glob("model_step_*.pt"):   # an earlier, longer run's would be decoded
            old.unlink()
        rc, rss = train_onmt(work, args.steps, bin_)
        results[PEER_NAMES["onmt"]] = {**throughput("onmt", work / "onmt" / "train.log", 20, args.steps),
                                       "peak_gb": rss}
    if "joey" in args.peers:
        cfg = peer_config("joey", work, args.steps)
        rc, rss, _ = timed([str(bin_ / "python"), "-m", "joeynmt", "train", str(cfg), "--skip-test"],
                           work / "joey" / "train.log", work)
        results[PEER_NAMES["joey"]] = {**throughput("joey", work / "joey" / "train.log", 20, args.steps),
                                       "peak_gb": rss}
    for precision in args.precision:
        results[f"rnnkit {precision}"] = train_rnnkit(work / f"rnnkit-{precision}", args.steps, precision)
    return results


def train_onmt(work: Path, steps: int, bin_: Path) -> tuple[int, float | None]:
    """OpenNMT-py's copy of the shared model, ``steps`` updates, into ``work``/onmt; (exit code, peak RSS GB)."""
    (work / "onmt").mkdir(parents=True, exist_ok=True)
    cfg = peer_config("onmt", work, steps)
    timed([str(bin_ / "onmt_build_vocab"), "-config", str(cfg), "-n_sample", "-1"], work / "onmt" / "vocab.log", work)
    for f in ("vocab.src", "vocab.tgt"):   # drop tokens its own reader rejects (see the peers' README)
        p = work / "onmt" / f
        p.write_text("".join(ln + "\n" for ln in p.read_text(encoding="utf-8").split("\n")[:-1]
                             if len(ln.split(None, 1)) == 2), encoding="utf-8")
    rc, rss, _ = timed([str(bin_ / "onmt_train"), "-config", str(cfg)], work / "onmt" / "train.log", work)
    return rc, rss


def train_rnnkit(run_dir: Path, steps: int, precision: str) -> dict:
    """configs/translate_attention.yaml for ``steps`` steps; one validation at the end (outside the timing)."""
    subprocess.call(["rm", "-rf", str(run_dir)])
    warm = min(20, steps // 2)      # steps before the timing starts (and the log interval)
    sets = [f"run_dir={run_dir}", f"train.max_steps={steps}", f"train.log_every={warm}", f"train.eval_every={steps}",
            "train.max_time=null", "train.num_threads=2", "train.device=cpu", f"train.precision={precision}"]
    rc, rss, _ = timed([sys.executable, "-m", "rnnkit", "train", str(ROOT / "configs" / "translate_attention.yaml"),
                        *[x for s in sets for x in ("--set", s)]], run_dir.with_suffix(".log"), ROOT)
    if rc != 0:
        return {"error": f"rnnkit training failed (exit {rc}); see {run_dir.with_suffix('.log')}"}
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in records if r["kind"] == "train"}
    chosen = [s for s in rows if warm < s <= steps]
    tokens = sum(rows[s]["tokens"] for s in chosen)
    dt = rows[steps]["elapsed"] - rows[warm]["elapsed"]
    valid = [r for r in records if r["kind"] == "eval"][-1]["valid_loss"]
    before_eval = rows[steps].get("peak_rss_mb")      # the training's own peak, before the final validation
    return {"s_per_step": dt / (steps - warm), "tokens_per_s": tokens / dt, "peak_gb": rss, "valid_loss": valid,
            "train_peak_gb": before_eval / 1000 if before_eval else None}


def print_training(results: dict, steps: int) -> None:
    print(f"translation training, shared model, CPU (OMP_NUM_THREADS=2), steps 20->{steps}:")
    print("peak RSS: the whole process's; 'before eval': rnnkit's at its last training step, before the one")
    print("validation it runs at the end (OpenNMT-py's runs here do not validate)")
    print(f"{'toolkit':<18} {'s/step':>7} {'tgt tok/s':>10} {'peak RSS GB':>12} {'before eval':>12} {'valid loss':>11}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} error: {r['error']}")
            continue
        loss = f"{r['valid_loss']:>11.4f}" if "valid_loss" in r else f"{'-':>11}"
        train_peak = f"{r['train_peak_gb']:>12.2f}" if r.get("train_peak_gb") else f"{'-':>12}"
        print(f"{name:<18} {r['s_per_step']:>7.3f} {r['tokens_per_s']:>10.0f} {r['peak_gb'] or 0:>12.2f} "
              f"{train_peak} {loss}")
    print_ratios(results, "tokens_per_s", "training")


def print_ratios(results: dict, key: str, what: str) -> None:
    """Each rnnkit row's speed over the faster peer's, measured in this run."""
    fastest = max((r[key] for n, r in results.items() if not n.startswith("rnnkit") and key in r), default=None)
    if not fastest:
        return
    for name, r in results.items():
        if name.startswith("rnnkit") and key in r:
            print(f"{what} ratio {name} / faster peer: {r[key] / fastest:.2f}")


if __name__ == "__main__":
    sys.exit(main())
