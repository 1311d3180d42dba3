"""``rnnkit data get``: copy or download a corpus, verify every byte, then move it into place.

Files are staged in a temporary folder beside the destination; only when every file has the
registered size and SHA-256 does the corpus folder appear (or get replaced), so a corrupted
or interrupted copy never sits where the configs would read it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator

from rnnkit.data.corpora import CORPORA, Corpus
from rnnkit.data.vocab import DataError

CHUNK = 1 << 20


def corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise DataError(f"no corpus named {name!r}; known: {', '.join(CORPORA)}")
    return CORPORA[name]


def _open(source: str, c: Corpus, rel: str) -> BinaryIO:
    if source.startswith(("http://", "https://")):
        url = f"{source.rstrip('/')}/{rel}" if source == c.upstream else f"{source.rstrip('/')}/{c.name}/{rel}"
        try:
            return urllib.request.urlopen(url, timeout=60)
        except (urllib.error.URLError, OSError) as err:
            raise DataError(f"cannot download {url}: {getattr(err, 'reason', err)}") from None
    path = Path(source) / c.name / rel
    try:
        return open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None


def _copy(stream: BinaryIO, out: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with stream, open(out, "wb") as fh:
        while True:
            block = stream.read(CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
            fh.write(block)
    return size, digest.hexdigest()


def get(name: str, source: str | None, dest: Path) -> Iterator[str]:
    """Fetch corpus ``name`` from ``source`` (a folder laid out like ``../shared/data``, or a
    base URL; default: its upstream address, when it has one) into ``dest/name``; yields one
    line per verified file."""
    c = corpus(name)
    source = source or c.upstream
    if source is None:
        raise DataError(f"{name} has no public download of these exact files ({c.source}); "
                        f"give --from a folder or mirror URL that holds {name}/")
    dest.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=dest))
    stage.chmod(0o755)
    try:
        for rel, size, sha in c.files:
            out = stage / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            got_size, got_sha = _copy(_open(source, c, rel), out)
            if (got_size, got_sha) != (size, sha):
                raise DataError(f"{name}/{rel} from {source}: {got_size:,} bytes with SHA-256 {got_sha[:16]}..., "
                                f"expected {size:,} bytes with {sha[:16]}...; a corrupted or partial copy, "
                                f"not installed")
            yield f"{name}/{rel}: {size:,} bytes, SHA-256 verified"
        final = dest / name
        if final.exists():
            old = dest / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(stage, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def status(c: Corpus, dest: Path) -> str:
    """'present' when every file is there with its registered size, 'missing' otherwise."""
    ok = all((dest / c.name / rel).is_file() and (dest / c.name / rel).stat().st_size == size
             for rel, size, _ in c.files)
    return "present" if ok else "missing"
