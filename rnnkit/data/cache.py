"""Where prepared data lives, and the keys that name it.

A key is a hash of everything the data depends on (the bytes of the input files and the
data settings), so a changed file or setting simply misses. The folder is ``$RNNKIT_CACHE``,
else ``$XDG_CACHE_HOME/rnnkit``, else ``~/.cache/rnnkit``; prepared stores go in its
``stores/`` (see :mod:`rnnkit.data.store`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

FORMAT = 3   # bump when what is stored under a key changes


def cache_dir() -> Path:
    if os.environ.get("RNNKIT_CACHE"):
        return Path(os.environ["RNNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnnkit"


def fingerprint(kind: str, files: Sequence[str], settings: Any) -> str:
    """A key for data built from ``files`` (by content, not name or date) with ``settings``."""
    h = hashlib.sha256(f"{kind}/{FORMAT}/{settings!r}".encode())
    for path in files:
        h.update(file_digest(path).encode())
    return f"{kind}-{h.hexdigest()[:32]}"


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (remembered for this process while its size and date stay)."""
    st = os.stat(path)
    known = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if known not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[known] = h.hexdigest()
    return _DIGESTS[known]
