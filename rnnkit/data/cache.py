"""A disk cache for prepared data: tokenizers fitted and sentences turned into ids once.

An entry's name is a hash of everything it depends on (the bytes of the input files and
the data settings), so a changed file or setting simply misses. Entries are written to a
temporary file and renamed into place, read back with ``torch.load(weights_only=True)``,
and one that cannot be read is rebuilt; a cache folder that cannot be written only costs
the time saved. The folder is ``$RNNKIT_CACHE``, else ``$XDG_CACHE_HOME/rnnkit``, else
``~/.cache/rnnkit``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from rnnkit.training.checkpoint import CheckpointError, atomic_save

FORMAT = 1   # bump when what an entry holds changes

Pairs = list[tuple[list[int], list[int]]]


def cache_dir() -> Path:
    if os.environ.get("RNNKIT_CACHE"):
        return Path(os.environ["RNNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnnkit"


def fingerprint(kind: str, files: Sequence[str], settings: Any) -> str:
    """A key for data built from ``files`` (by content, not name or date) with ``settings``."""
    h = hashlib.sha256(f"{kind}/{FORMAT}/{settings!r}".encode())
    for path in files:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0end-of-file\0")
    return f"{kind}-{h.hexdigest()[:32]}"


def load(key: str) -> dict | None:
    path = cache_dir() / f"{key}.pt"
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # truncated, corrupted or from an incompatible torch: rebuild it
        return None
    return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None


def save(key: str, entry: dict) -> None:
    """Store ``entry`` atomically; a folder that cannot be written is skipped."""
    try:
        atomic_save({**entry, "format": FORMAT}, cache_dir() / f"{key}.pt")
    except (OSError, CheckpointError):
        pass


def pack(pairs: Pairs) -> dict[str, torch.Tensor]:
    """Sentence pairs of ids as four flat tensors (ids and lengths per side)."""
    out = {}
    for side in (0, 1):
        seqs = [p[side] for p in pairs]
        out[f"ids{side}"] = torch.tensor([i for s in seqs for i in s], dtype=torch.int32)
        out[f"len{side}"] = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
    return out


def unpack(packed: dict[str, torch.Tensor]) -> Pairs:
    sides = []
    for side in (0, 1):
        ids, lengths = packed[f"ids{side}"].tolist(), packed[f"len{side}"].tolist()
        seqs, start = [], 0
        for n in lengths:
            seqs.append(ids[start:start + n])
            start += n
        sides.append(seqs)
    return list(zip(*sides))
