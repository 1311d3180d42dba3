"""Every benchmark runs at its --quick size, so a refactor that breaks one fails here.

The figures they print at that size mean nothing; what is checked is that each runs to its
end and prints its table. Those that need what this suite's machines lack are skipped by
name, each with its reason. The corpora come from ../shared/data; a benchmark without them
prints 'skipped' and exits 0, and so does its test.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DATA = ROOT.parent / "shared" / "data"

# script -> (arguments, a line fragment its finished table prints)
QUICK = {
    "__main__.py": (["-m", "bench", "--quick"], "rnnkit benchmark suite"),
    "bf16.py": (["--quick"], "beam-5 decoding int8"),
    "forecast.py": (["--quick"], "MSE/DLinear"),
    "memory_lab.py": (["--quick"], "gradient-flow curves"),
    "memory.py": (["--quick"], "variable / fixed peak RSS"),
    "wikitext2.py": (["--quick"], "training tokens/s: full softmax"),
    "serve.py": (["--quick", "--no-onmt"], "SIGTERM under"),
    "distributed.py": (["--quick"], "scaling efficiency"),
    "export.py": (["--quick"], "start-to-finish, checkpoint / export"),
    "tune.py": (["--quick"], "quick sweep:"),
    "cells.py": (["--quick"], "step-form generation"),
    "attention.py": (["--quick"], "hierarchical predict --attention:"),
    "streams.py": (["--quick"], "faults: rnnkit serve after SIGTERM"),
    "online.py": (["--quick"], "| H | protocol"),
    "transfer.py": (["--quick", "--stages", "pretrain", "sentiment", "--features", "word"],
                    "rt-polarity dev accuracy, ULMFiT"),
}
# run by `python -m bench --quick` above, whose table has a ratio from each (checked below)
IN_SUITE = {"lm_throughput.py", "explicit_cells.py", "translate.py", "gemm_share.py"}
SKIPPED = {     # not run here, each for the reason given (a test below checks that every script is named)
    "peers.py": "installs and trains the peer toolkits (OpenNMT-py, Joey NMT) from ../shared/bench/peers",
    "scale.py": "trains OpenNMT-py beside rnnkit on corpora of up to 345 Multi30k copies",
    "gpu_check.py": "needs a CUDA device (bench/gpu_check.sh on a GPU machine)",
    "cells_tasks.py": "trains every cell for 15 minutes on the adding problem and on WikiText-2; the scan cells' "
                      "training in every task is tests/test_scan_tasks.py",
}
LIBRARIES = {"__init__.py", "machine.py"}      # imported by the others, nothing to run


def test_every_benchmark_is_run_here_or_skipped_by_name():
    scripts = {p.name for p in BENCH.glob("*.py")} - LIBRARIES
    assert scripts == set(QUICK) | IN_SUITE | set(SKIPPED)
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import NEEDS_PEERS, PARTS

    assert {script for _, script, _, _ in PARTS} == IN_SUITE | NEEDS_PEERS


@pytest.mark.parametrize("script", sorted(QUICK))
def test_benchmark_runs_at_its_quick_size(script, tmp_path):
    args, expected = QUICK[script]
    cmd = [sys.executable, *(args if script == "__main__.py" else [str(BENCH / script), *args])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if script == "transfer.py":
        cmd += ["--out", str(tmp_path / "transfer")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    if res.stdout.startswith("skipped:") and not DATA.is_dir():
        pytest.skip(f"{script}: needs the corpora in {DATA}, which this machine lacks ({res.stdout.strip()})")
    assert expected in res.stdout, res.stdout[-2000:]
    if script == "__main__.py":     # every part but the peers' printed its ratio
        table = res.stdout.split(expected, 1)[1]
        assert table.count(" skipped ") == 2, table    # the two peer rows


def test_machine_description_names_each_flag_had_or_lacked(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench import machine

    monkeypatch.setattr(machine, "cpu_model_and_flags", lambda: ("Some CPU", {"avx2", "avx512f", "sse4_2"}))
    assert machine.cpu_description() == ("Some CPU (avx2, avx512f; no avx512_vnni, no avx512_bf16, "
                                         "no amx_bf16)")
