"""Prepared stores: a corpus tokenised once into flat arrays of token ids on disk.

A store is a folder::

    manifest.json      format, kind, sources (path, bytes, SHA-256), settings, counts,
                       tokenizers, and every array file with its dtype and size
    train.src.ids      token ids of all sentences end to end (uint16 when the vocabulary fits, else int32)
    train.src.idx      int64 offsets: sentence i is ids[idx[i]:idx[i + 1]]
    train.src.key      per pair, the length that batching sorts by (uint8 when max_len allows, else uint16)
    src.spm            a sentencepiece model, when the tokenizer is one

Stores live in ``<cache>/stores/<key>``, the key a hash of the source files' bytes and the
data settings (:func:`rnnkit.data.cache.fingerprint`), so a changed file or setting misses.
A store is written under a temporary name and renamed into place last: a killed prepare
leaves nothing that looks complete. Opening one checks that every file the manifest lists
is there with its size; a damaged store is rebuilt (in the cache) or refused with one line.

Training reads random sentences with ``pread`` (through the page cache, which every process
and every torchrun rank share), and language-model streams through ``np.memmap``: neither
copies the corpus into the process.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from rnnkit.data.vocab import DataError
from rnnkit.processes import process_alive

FORMAT = 1
MANIFEST = "manifest.json"
OFFSET = np.dtype(np.int64)


class StoreError(DataError):
    """A store that is missing, incomplete or damaged; shown as one line."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


# ---------------------------------------------------------------------- sentences of ids
class TokenArray:
    """Sentences of token ids laid end to end: ``ids[offsets[i]:offsets[i + 1]]`` is sentence i."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "TokenArray":
        lengths = np.fromiter((len(s) for s in seqs), OFFSET, len(seqs))
        offsets = np.zeros(len(seqs) + 1, OFFSET)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for s in seqs for t in s), np.int64, int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)

    def gather(self, indices: Iterable[int]) -> list[np.ndarray]:
        return [self[int(i)] for i in indices]


class StoredTokenArray(TokenArray):
    """A store's sentences, each read when asked for with ``pread``: random sentences from a
    corpus of any size without mapping it into the process (a mapped page that was read counts
    toward the process's resident memory; the page cache holds one copy either way)."""

    def __init__(self, ids_path: Path, offsets_path: Path, dtype: np.dtype, count: int):
        self.ids_path, self.dtype, self.count = ids_path, np.dtype(dtype), count
        self._ids = os.open(ids_path, os.O_RDONLY)
        self._offsets = os.open(offsets_path, os.O_RDONLY)
        self.offsets = np.memmap(offsets_path, OFFSET, mode="r")   # for lengths() of small splits

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        start, end = np.frombuffer(os.pread(self._offsets, 16, OFFSET.itemsize * int(i)), OFFSET)
        size = self.dtype.itemsize
        raw = os.pread(self._ids, int(end - start) * size, int(start) * size)
        return np.frombuffer(raw, self.dtype).astype(np.int64)

    def in_memory(self) -> TokenArray:
        return TokenArray(np.fromfile(self.ids_path, self.dtype), np.array(self.offsets))

    def __del__(self):
        for fd in (getattr(self, "_ids", None), getattr(self, "_offsets", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


# ---------------------------------------------------------------------- batching
class Permutation:
    """A pseudo-random bijection of [0, n) that maps any index on demand: a keyed six-round
    Feistel network (splitmix64's finaliser as the round function; halves of unequal width
    when the bit count is odd) on the next power of two, walking cycles back into [0, n).
    It shuffles a corpus of any size in constant memory."""

    MIX1, MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

    def __init__(self, n: int, seed: int):
        self.n = n
        bits = max(2, (max(1, n) - 1).bit_length())
        self.widths = ((bits + 1) // 2, bits // 2)      # left, right
        self.keys = [np.uint64(k) for k in np.random.default_rng(seed).integers(0, 2 ** 63, size=6)]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        wl, wr = self.widths
        left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
        for key in self.keys:        # (L, R) -> (R, L ^ F(R)): invertible whatever the widths
            h = right + key
            h = (h ^ (h >> np.uint64(30))) * self.MIX1
            h = (h ^ (h >> np.uint64(27))) * self.MIX2
            h ^= h >> np.uint64(31)
            left, right = right, left ^ (h & np.uint64((1 << wl) - 1))
            wl, wr = wr, wl
        return (left << np.uint64(wr)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = self._rounds(np.asarray(index, dtype=np.uint64))
            outside = np.flatnonzero(out >= self.n)
            while len(outside):
                out[outside] = self._rounds(out[outside])
                outside = outside[out[outside] >= self.n]
        return out.astype(np.int64)


class Batches(Sequence):
    """An epoch's batches of indices of similar length, made when asked for. The (shuffled)
    indices fall into pools of ``pool`` batches; a pool is sorted by length and cut into
    batches of ``batch_size`` sentences or of at most ``batch_tokens`` padded tokens; the
    batches of all pools are then shuffled. Memory: two int32 per batch, and one pool."""

    def __init__(self, keys: Sequence[int] | np.ndarray, batch_size: int, batch_tokens: int | None = None,
                 seed: int | None = None, pool: int = 100):
        self.keys, self.batch_size, self.batch_tokens = np.asarray(keys), batch_size, batch_tokens
        self.n, self.chunk = len(self.keys), pool * batch_size
        self.perm = Permutation(self.n, seed) if seed is not None else None
        self._cached: tuple = (None, None, None)
        pools = -(-self.n // self.chunk)
        if batch_tokens is None:     # every pool but the last is full: its batch count is known
            sizes = np.minimum(self.chunk, self.n - np.arange(pools, dtype=np.int64) * self.chunk)
            counts = -(-sizes // batch_size)
        else:
            counts = np.array([len(self._pool(p)[1]) - 1 for p in range(pools)], dtype=np.int64)
        self.pool_of = np.repeat(np.arange(pools, dtype=np.int32), counts)
        self.slot_of = (np.arange(len(self.pool_of)) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int32)
        if seed is not None:
            order = np.random.default_rng(seed).permutation(len(self.pool_of))
            self.pool_of, self.slot_of = self.pool_of[order], self.slot_of[order]

    def _pool(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Pool ``p``'s indices sorted by length, and where its batches start (and the end)."""
        if self._cached[0] == p:
            return self._cached[1:]
        members = np.arange(p * self.chunk, min(self.n, (p + 1) * self.chunk), dtype=np.int64)
        if self.perm is not None:
            members = self.perm(members)
        keys = self.keys[members]
        order = np.argsort(keys, kind="stable")
        members, keys = members[order], keys[order].astype(np.int64)
        if self.batch_tokens is None:
            cuts = np.append(np.arange(0, len(members), self.batch_size), len(members))
        else:
            cuts = np.append(_token_cuts(keys, self.batch_tokens), len(members))
        self._cached = (p, members, cuts)
        return members, cuts

    def __len__(self) -> int:
        return len(self.pool_of)

    def __getitem__(self, b: int) -> np.ndarray:
        members, cuts = self._pool(int(self.pool_of[b]))
        s = int(self.slot_of[b])
        return members[cuts[s]:cuts[s + 1]]


def bucket_batches(keys: Sequence[int] | np.ndarray, batch_size: int, batch_tokens: int | None = None,
                   seed: int | None = None, pool: int = 100) -> Batches:
    """Indices grouped by similar ``keys`` (lengths) into batches; with a ``seed`` in a random
    order that the seed fixes, without one in order of length within each pool (see :class:`Batches`)."""
    return Batches(keys, batch_size, batch_tokens, seed, pool)


def _token_cuts(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Starts of the batches that cut ascending ``lengths`` greedily so that each batch's
    longest length times its size is at most ``budget`` (a longer sentence goes alone)."""
    cuts, s, m = [], 0, len(lengths)
    while s < m:
        window = lengths[s:min(m, s + max(1, budget // max(1, int(lengths[s]))))]
        fits = int(np.count_nonzero(window * np.arange(1, len(window) + 1) <= budget))
        cuts.append(s)
        s += max(1, fits)
    return np.asarray(cuts, dtype=np.int64)


# ---------------------------------------------------------------------- a store on disk
class Store:
    """An opened, checked store."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path, self.manifest = Path(path), manifest

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{path}: not a prepared store (no {MANIFEST}); run 'rnnkit prepare CONFIG'") from None
        except (OSError, ValueError) as err:
            raise StoreError(f"{path / MANIFEST}: damaged ({err}); prepare the store again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path / MANIFEST}: not a store of format {FORMAT}; prepare the store again")
        for name, info in manifest.get("files", {}).items():
            file = path / name
            try:
                size = file.stat().st_size
            except OSError:
                raise StoreError(f"{file}: missing from the prepared store; prepare it again") from None
            if size != info["bytes"]:
                raise StoreError(f"{file}: {size:,} bytes, the manifest says {info['bytes']:,} (damaged); "
                                 f"prepare the store again")
        return cls(path, manifest)

    def array(self, name: str) -> StoredTokenArray:
        info = self.manifest["arrays"][name]
        return StoredTokenArray(self.path / f"{name}.ids", self.path / f"{name}.idx", np.dtype(info["dtype"]),
                                info["sentences"])

    def stream(self, name: str) -> np.ndarray:
        """All of an array's tokens as one read-only mapped stream."""
        info = self.manifest["arrays"][name]
        if info["tokens"] == 0:
            return np.zeros(0, np.dtype(info["dtype"]))
        return np.memmap(self.path / f"{name}.ids", np.dtype(info["dtype"]), mode="r")

    def keys(self, name: str) -> np.ndarray:
        info = self.manifest["arrays"][name]
        dtype = np.dtype(info["key_dtype"])
        return np.memmap(self.path / f"{name}.key", dtype, mode="r") if info["sentences"] else np.zeros(0, dtype)

    def tokenizer_state(self, name: str) -> dict[str, Any]:
        state = dict(self.manifest["tokenizers"][name])
        del state["size"]
        if "model_file" in state:
            state["model"] = (self.path / state.pop("model_file")).read_bytes()
        return state

    def summary(self) -> list[tuple[str, str]]:
        """(what, value) rows for ``rnnkit data info``."""
        m = self.manifest
        rows = [("store", str(self.path)), ("kind", m["kind"]), ("created", m.get("created", "?"))]
        for src in m["sources"]:
            rows.append(("source", f"{src['path']} ({src['bytes']:,} bytes, sha256 {src['sha256'][:16]}…)"))
        for name, info in m["arrays"].items():
            rows.append((name, f"{info['sentences']:,} sequences, {info['tokens']:,} tokens, {info['dtype']}"))
        for name, tok in m["tokenizers"].items():
            rows.append((f"{name} tokenizer", f"{tok['kind']}, {tok['size']:,} types"))
        rows.append(("settings", json.dumps(m["settings"], sort_keys=True)))
        rows.extend(("note", note) for note in m.get("notes", []))
        total = sum(f["bytes"] for f in m["files"].values())
        rows.append(("on disk", f"{total / 1e6:,.1f} MB in {len(m['files'])} files"))
        return rows


class ArrayWriter:
    """Appends sentences to ``NAME.ids`` / ``NAME.idx`` (and ``NAME.key``) of a store being written."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, keys: np.dtype | None = None):
        self.name, self.dtype, self.sentences, self.tokens = name, np.dtype(dtype), 0, 0
        self.key_dtype = None if keys is None else np.dtype(keys)
        self.ids = open(folder / f"{name}.ids", "wb")
        self.idx = open(folder / f"{name}.idx", "wb")
        self.key = open(folder / f"{name}.key", "wb") if keys is not None else None
        np.zeros(1, OFFSET).tofile(self.idx)

    def add(self, ids: np.ndarray, lengths: np.ndarray, keys: np.ndarray | None = None) -> None:
        if len(ids) and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(ids.max())} does not fit {self.dtype}")
        ids.astype(self.dtype, copy=False).tofile(self.ids)
        (self.tokens + np.cumsum(lengths, dtype=OFFSET)).tofile(self.idx)
        if self.key is not None:
            np.minimum(keys, np.iinfo(self.key_dtype).max).astype(self.key_dtype).tofile(self.key)
        self.sentences += len(lengths)
        self.tokens += int(lengths.sum())

    def close(self) -> dict[str, Any]:
        for fh in (self.ids, self.idx, self.key):
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
        info = {"dtype": self.dtype.name, "sentences": self.sentences, "tokens": self.tokens}
        if self.key_dtype is not None:
            info["key_dtype"] = self.key_dtype.name
        return info


class StoreWriter:
    """Writes a store under a temporary name beside ``final`` and renames it into place last."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.{os.getpid()}.tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.arrays: dict[str, ArrayWriter] = {}

    def array(self, name: str, dtype: np.dtype, keys: np.dtype | None = None) -> ArrayWriter:
        self.arrays[name] = ArrayWriter(self.tmp, name, dtype, keys)
        return self.arrays[name]

    def tokenizer(self, name: str, state: dict[str, Any]) -> dict[str, Any]:
        """The manifest's entry for a tokenizer state (a sentencepiece model goes in its own file)."""
        if "model" in state:
            (self.tmp / f"{name}.spm").write_bytes(state["model"])
            from rnnkit.data.tokenizers import tokenizer_from_state

            size = len(tokenizer_from_state(state).vocab)
            return {"kind": state["kind"], "model_file": f"{name}.spm", "size": size}
        return {**state, "size": len(state["vocab"])}

    def finish(self, manifest: dict[str, Any]) -> Path:
        manifest = {"format": FORMAT, **manifest,
                    "arrays": {name: w.close() for name, w in self.arrays.items()}}
        manifest["files"] = {f.name: {"bytes": f.stat().st_size} for f in sorted(self.tmp.iterdir()) if f.is_file()}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not (self.final / MANIFEST).exists():   # a damaged one: ours replaces it
                shutil.rmtree(self.final, ignore_errors=True)
                os.rename(self.tmp, self.final)
            else:                                     # another process finished the same store first
                self.abort()
        return self.final

    def abort(self) -> None:
        for w in self.arrays.values():
            for fh in (w.ids, w.idx, w.key):
                if fh is not None and not fh.closed:
                    fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_stale(root: Path) -> None:
    """Temporary folders of prepares whose process is gone (killed mid-way)."""
    if not root.is_dir():
        return
    for tmp in root.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
