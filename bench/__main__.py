"""Run the benchmark suite and print one table of the ratios each part measured.

    python -m bench            (or: make bench)
    python -m bench --quick    (each part at its --quick size, the peers left out: checks the plumbing)

Each part runs as its own process, rnnkit and its baseline one after the other inside it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = [
    ("LM training vs raw PyTorch loop", "lm_throughput.py", r"ratio rnnkit/raw: ([\d.]+)", ">= 0.95"),
    ("translation training vs hand-written seq2seq", "translate.py", r"training.*ratio ([\d.]+)", "-"),
    ("beam-5 decoding vs hand-written beam search", "translate.py", r"beam-5.*ratio ([\d.]+)", "-"),
    ("translation training vs faster peer", "peers.py", r"training ratio rnnkit / faster peer: ([\d.]+)",
     ">= 1.5 (CPU)"),
    ("beam-5 decoding vs faster peer", "peers.py", r"decoding ratio rnnkit / faster peer: ([\d.]+)", ">= 2 (CPU)"),
    ("training: ceiling with matrix products alone", "gemm_share.py", r"training.*products ([\d.]+)x", "-"),
    ("explicit LSTM step / fused (lower is better)", "explicit_cells.py",
     r"\nexplicit +[\d.]+ s/step +ratio to fused ([\d.]+)", "<= 1.5"),
    ("layer-norm LSTM step / fused (lower is better)", "explicit_cells.py",
     r"layer norm +[\d.]+ s/step +ratio to fused ([\d.]+)", "<= 2.0"),
]


NEEDS_PEERS = {"peers.py"}      # the peer toolkits, installed by ../shared/bench/peers


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    outputs: dict[str, str] = {}
    failed = []
    for script in dict.fromkeys(p[1] for p in PARTS):
        print(f"== {script}", flush=True)
        if quick and script in NEEDS_PEERS:
            print(f"{script}: skipped under --quick (it installs and trains the peer toolkits)")
            continue
        cmd = [sys.executable, str(HERE / script), *(["--quick"] if quick else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        outputs[script] = res.stdout
        print(res.stdout, end="", flush=True)
        if res.returncode != 0:
            failed.append(script)
            print(f"{script} failed: {res.stderr.strip().splitlines()[-1:] }")
    device = next((m.group(0) for out in outputs.values() for m in [re.search(r"device: .*", out)] if m), "device: ?")
    print(f"\nrnnkit benchmark suite ({device})")
    print(f"{'measure':<46} {'ratio':>7}  target")
    for name, script, pattern, target in PARTS:
        m = re.search(pattern, outputs.get(script, ""))
        print(f"{name:<46} {m.group(1) if m else 'skipped':>7}  {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
