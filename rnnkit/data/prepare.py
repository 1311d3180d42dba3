"""Preparing a store: read the corpus as a stream, tokenise it in N worker processes, write
the flat arrays (see :mod:`rnnkit.data.store`).

The files are cut into chunks of :data:`CHUNK_LINES` lines, fewer when lines are long (about
:data:`CHUNK_BYTES` a chunk), in one pass counting line breaks.
A worker reads its chunk's bytes, checks them (UTF-8, no NUL bytes, no absurdly long lines),
tokenises every line and writes the ids to a part file. When the vocabulary is still to be
fitted, a worker numbers the types of its chunk in first-seen order and counts them; the
counts are merged in chunk order (so ties keep the corpus's first-seen order, as fitting in
one process does) and each part's ids are mapped to the vocabulary's with one array lookup.
No step holds more than a chunk per process; sentencepiece trains on a bounded sample.
This module does not import torch, so workers start in a fraction of a second.
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from rnnkit.data import cache
from rnnkit.data.store import Store, StoreError, StoreWriter, remove_stale
from rnnkit.data.vocab import DataError, check_line_lengths, decode_text, split_lines

CHUNK_LINES = 50_000
CHUNK_BYTES = 8 << 20      # a chunk's text, roughly: bounds a worker's memory when lines are long
BLOCK = 1 << 24


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------- reading as a stream
@dataclass(frozen=True)
class Piece:
    """``lines`` lines of ``path`` from line ``first_line`` (1-based), bytes [start, end)."""
    path: str
    start: int
    end: int
    first_line: int
    lines: int


def cut_lines(path: str, start: int = 0, end: int | None = None, every: int | None = None,
              allow_empty: bool = False) -> tuple[list[Piece], int]:
    """Cut bytes [start, end) of ``path`` into pieces of ``every`` lines (at line breaks), in one
    streaming pass; also the number of lines. A file with no text is a DataError unless
    ``allow_empty``."""
    every = every or chunk_lines(path, start=start)
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    with fh:
        end = os.fstat(fh.fileno()).st_size if end is None else end
        before = sum(block.count(b"\n") for block in _blocks(fh, 0, start))    # line numbers for errors
        cuts, lines, pos, text, last = [start], 0, start, False, b""
        for block in _blocks(fh, start, end):
            text = text or not block.isspace()
            n = block.count(b"\n")
            if lines // every != (lines + n) // every:     # a cut falls in this block
                breaks = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
                for k in range((lines // every + 1) * every, lines + n + 1, every):
                    cuts.append(pos + int(breaks[k - lines - 1]) + 1)
            lines += n
            pos += len(block)
            last = block[-1:]
    if not text and not allow_empty:
        raise DataError(f"{path}: file is empty")
    if last and last != b"\n":
        lines += 1                                          # a last line without its line break
    if cuts[-1] < end:
        cuts.append(end)
    pieces = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        pieces.append(Piece(path, a, b, before + i * every + 1, min(every, lines - i * every)))
    return pieces, lines


def chunk_lines(*paths: str, start: int = 0) -> int:
    """Lines per chunk for these files: :data:`CHUNK_LINES`, or fewer so that a chunk holds
    about :data:`CHUNK_BYTES` (estimated from the first megabyte from ``start``), at least 100."""
    longest = 1
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                sample = fh.read(1 << 20)
        except OSError:
            continue
        longest = max(longest, len(sample) // max(1, sample.count(b"\n")))
    return min(CHUNK_LINES, max(100, CHUNK_BYTES // longest))


def _blocks(fh, start: int, end: int) -> Iterator[bytes]:
    fh.seek(start)
    pos = start
    while pos < end:
        block = fh.read(min(BLOCK, end - pos))
        if not block:
            return
        pos += len(block)
        yield block


def read_piece(piece: Piece, check_lines: bool = True) -> str:
    """A piece's text, checked: NUL bytes and bad UTF-8 name the file and line."""
    with open(piece.path, "rb") as fh:
        fh.seek(piece.start)
        raw = fh.read(piece.end - piece.start)
    text = decode_text(raw, piece.path, piece.first_line)
    if check_lines:
        check_line_lengths(split_lines(text), piece.path, piece.first_line)
    return text


def stream_lines(path: str) -> Iterator[str]:
    """The lines of a file, one at a time (for sentencepiece's sample)."""
    pieces, _ = cut_lines(path)
    for piece in pieces:
        yield from split_lines(read_piece(piece))


# ---------------------------------------------------------------------- tokenising in workers
# A side's tokenizer, as a worker gets it: ("split", kind) splits into tokens that the worker
# numbers in first-seen order (the main process maps them to the vocabulary, fitted or given);
# ("ids", state) is a sentencepiece model that gives the final ids itself.
_TOKENIZERS: dict[str, tuple[bool, Callable]] = {}


def _make_encoder(spec: tuple[str, Any]) -> tuple[bool, Callable]:
    mode, what = spec
    if mode == "ids":
        from rnnkit.data.tokenizers import tokenizer_from_state

        return False, tokenizer_from_state(what).sp.encode      # a list of texts in, lists of ids out
    if what == "lm-char":
        split = list
    elif what == "lm-word":
        from rnnkit.data.vocab import WordTokenizer
        split = WordTokenizer().split
    else:
        from rnnkit.data.tokenizers import SPLITTERS
        split = SPLITTERS[what].split
    return True, lambda units: list(map(split, units))


def _init_worker(specs: dict[str, tuple[str, Any]]) -> None:
    _TOKENIZERS.clear()
    _TOKENIZERS.update({name: _make_encoder(spec) for name, spec in specs.items()})


@dataclass
class Part:
    """One side of one chunk, tokenised into part files: int32 ids (numbered locally, in
    first-seen order, when ``types`` is set) and tokens per line (per chunk for a stream)."""
    ids: str
    lengths: str
    types: str | None = None            # a JSON file of the local types
    counts: np.ndarray | None = None    # of the local types (dropped once merged)
    local: list[str] | None = None


@dataclass
class Job:
    sides: list[tuple[str, Piece]]      # (tokenizer name, piece) for each side of the chunk
    out: str                            # the folder for part files
    lines: bool                         # a sentence per line (else the chunk is one stream)
    count: int                          # lines, for the progress bar


def _encode(name: str, piece: Piece, out: Path, lines: bool) -> Part:
    local, encode = _TOKENIZERS[name]
    text = read_piece(piece, check_lines=lines)
    seqs = encode(split_lines(text) if lines else [text])
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    flat = list(chain.from_iterable(seqs))
    stem = out / f"part-{name}-{piece.start}"
    lengths.tofile(f"{stem}.len")
    if not local:
        np.asarray(flat, dtype=np.int32).tofile(f"{stem}.ids")
        return Part(f"{stem}.ids", f"{stem}.len")
    table = {t: i for i, t in enumerate(dict.fromkeys(flat))}      # first-seen order
    ids = np.fromiter(map(table.__getitem__, flat), np.int32, len(flat))
    ids.tofile(f"{stem}.ids")
    types = list(table)
    Path(f"{stem}.types").write_text(json.dumps(types, ensure_ascii=False), encoding="utf-8")
    return Part(f"{stem}.ids", f"{stem}.len", f"{stem}.types", np.bincount(ids, minlength=len(types)), types)


def encode_job(job: Job) -> list[Part]:
    """A chunk's sides, tokenised into part files."""
    return [_encode(name, piece, Path(job.out), job.lines) for name, piece in job.sides]


def run_jobs(jobs: list[Job], specs: dict[str, tuple[str, Any]], workers: int, desc: str) -> Iterator[list[Part]]:
    """Results of ``jobs`` in order, from ``workers`` processes (in this one for a single job),
    with a progress bar in lines per second (on a terminal, for more than a few chunks)."""
    total = sum(j.count for j in jobs)
    bar = tqdm(total=total, desc=desc, unit=" lines", unit_scale=True, leave=False,
               disable=None if len(jobs) > 2 else True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(specs)
            for job in jobs:
                parts = encode_job(job)
                bar.update(job.count)
                yield parts
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(specs,)) as pool:
            for job, parts in zip(jobs, pool.imap(encode_job, jobs)):
                bar.update(job.count)
                yield parts
    finally:
        bar.close()


# ---------------------------------------------------------------------- vocabularies
def merge_counts(counts: dict[str, int], part: Part) -> None:
    """Add a part's type counts (in its first-seen order) to ``counts``; frees them from the part."""
    for t, c in zip(part.local, part.counts.tolist()):
        counts[t] = counts.get(t, 0) + c
    part.local = part.counts = None


def read_part(part: Part, stoi: dict[str, int] | None, unk: int) -> tuple[np.ndarray, np.ndarray]:
    """A part's ids in the final vocabulary's numbering, and its lengths (its files are removed)."""
    ids, lengths = np.fromfile(part.ids, np.int32), np.fromfile(part.lengths, np.int64)
    for f in (part.ids, part.lengths):
        os.unlink(f)
    if part.types is None:
        return ids, lengths
    types = json.loads(Path(part.types).read_text(encoding="utf-8"))
    os.unlink(part.types)
    table = np.fromiter((stoi.get(t, unk) for t in types), np.int32, len(types))
    return table[ids], lengths


# ---------------------------------------------------------------------- finding or making a store
def stores_root() -> Path:
    return cache.cache_dir() / "stores"


def store_path(kind: str, sources: Sequence[str], settings: dict[str, Any]) -> Path:
    """Where the store of ``sources`` prepared with ``settings`` lives in the cache."""
    return stores_root() / cache.fingerprint(kind, sources, sorted(settings.items()))


def _state_digest(states: Any) -> str:
    """A short hash of tokenizer states (vocabularies, sentencepiece models)."""
    import hashlib
    import pickle

    return hashlib.sha256(pickle.dumps(states, protocol=4)).hexdigest()[:16]


def ensure_store(kind: str, sources: Sequence[str], settings: dict[str, Any],
                 build: Callable[[StoreWriter, int], dict[str, Any]], workers: int | None = None,
                 use_cache: bool = True, given: Any = None, given_of: Callable[[Store], Any] | None = None,
                 announce: Callable[[str], None] = tqdm.write) -> Store:
    """The store of ``sources`` prepared with ``settings``: opened from the cache when there,
    else built by ``build(writer, workers)``, which returns the manifest's task-specific part.
    With ``given`` tokenizers (a resumed run's), the fitted store serves when ``given_of(store)``
    equals them, and otherwise a store of their own is keyed by their hash. A damaged store in
    the cache is rebuilt with a note. ``use_cache`` false: built in a private folder that is
    removed when the process ends. An unreadable source is a DataError."""
    try:
        return _ensure(kind, sources, settings, build, workers, use_cache, given, given_of, announce)
    except OSError as err:     # hashing a source that cannot be read
        raise DataError(f"{err.filename}: cannot read ({err.strerror})") from None


def _ensure(kind, sources, settings, build, workers, use_cache, given, given_of, announce) -> Store:
    if given is not None:
        if use_cache:
            try:
                fitted = Store.open(store_path(kind, sources, settings))
                if given_of(fitted) == given:
                    return fitted
            except StoreError:
                pass
        settings = {**settings, "given": _state_digest(given)}
    final = store_path(kind, sources, settings)
    root = final.parent
    if not use_cache:
        root = Path(_private_root())
        final = root / final.name
    if use_cache:
        remove_stale(root)
        if final.exists():
            try:
                return Store.open(final)
            except StoreError as err:
                announce(f"{err}: rebuilding it")
                shutil.rmtree(final, ignore_errors=True)
    started = time.perf_counter()
    try:
        writer = StoreWriter(final)
    except OSError as err:
        raise DataError(f"cannot write a prepared store in {root}: {err.strerror or err} "
                        f"(set RNNKIT_CACHE to a writable folder)") from None
    try:
        body = build(writer, workers or default_workers())
        sources_info = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p),
                         "sha256": cache.file_digest(p)} for p in sources]
        manifest = {"kind": kind, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "seconds": round(time.perf_counter() - started, 2), "settings": settings,
                    "sources": sources_info, **body}
        path = writer.finish(manifest)
    except OSError as err:
        writer.abort()
        what = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise DataError(f"cannot write the prepared store {final}: {what}; nothing was kept") from None
    except BaseException:
        writer.abort()
        raise
    return Store.open(path)


_PRIVATE: list[str] = []


def _private_root() -> str:
    """A temporary folder for stores of runs with ``data.cache: false``, removed at exit."""
    if not _PRIVATE:
        import atexit
        import tempfile

        _PRIVATE.append(tempfile.mkdtemp(prefix="rnnkit-store-"))
        atexit.register(shutil.rmtree, _PRIVATE[0], True)
    return _PRIVATE[0]
