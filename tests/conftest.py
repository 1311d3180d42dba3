from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_TEXT = ROOT / "data" / "harbour.txt"


def tiny_lm_config(tmp_path: Path, **sections) -> dict:
    """A fast character-LM config on the bundled sample text, writing into ``tmp_path``."""
    cfg = {
        "task": "lm",
        "run_dir": str(tmp_path / "run"),
        "seed": 7,
        "data": {"path": str(SAMPLE_TEXT), "split": [0.8, 0.2, 0.0], "tokenizer": "char", "bptt": 16},
        "model": {"cell": "lstm", "embedding_dim": 16, "hidden_size": 32, "num_layers": 1},
        "train": {"batch_size": 8, "eval_batch_size": 4, "max_steps": 20, "log_every": 5,
                  "eval_every": 10, "lr": 0.01},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    return cfg


def overfit_tiny_batch(model, vocab: int = 12, steps: int = 300) -> float:
    """Train a language model on one fixed random batch; returns the final loss."""
    import torch
    import torch.nn.functional as F

    x, y = torch.randint(0, vocab, (4, 12)), torch.randint(0, vocab, (4, 12))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return loss.item()


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def lm_config_file(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "lm.yaml", tiny_lm_config(tmp_path))


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process():
    """Small models run faster single-threaded, and CI machines are small."""
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path: Path, monkeypatch):
    """Each test gets an empty data cache of its own, never the user's."""
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "data-cache"))


def run_without_torch(first: str, commands: list[list[str]]) -> list[str]:
    """Run ``first`` (Python code that prints one line, after ``import rnnkit``), then each of
    ``commands`` through ``rnnkit.cli.main``, in a process whose import of torch fails; its
    stdout lines, the last one saying whether torch got imported."""
    import json
    import os
    import subprocess
    import sys

    script = f"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is refused here")
sys.meta_path.insert(0, Refuse())
import rnnkit
{first}
from rnnkit.cli import main
for args in json.loads({json.dumps(json.dumps(commands))}):
    try:
        main(args)
    except SystemExit as done:
        assert done.code in (0, None), done.code
print("torch imported:", "torch" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()
