"""What goes into a store for each kind of corpus: parallel sentence pairs (translation) and
continuous text streams (language models). Both run on :mod:`rnnkit.data.prepare`'s workers."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from rnnkit.data.prepare import Job, Piece, chunk_lines, cut_lines, merge_counts, read_part, run_jobs, stream_lines
from rnnkit.data.store import StoreWriter, token_dtype
from rnnkit.data.tokenizers import SPECIALS, SentencePieceSplitter, tokenizer_from_state
from rnnkit.data.vocab import EOS, UNK, DataError, Vocab

# A side's tokenizer: ("fit", kind, vocab_size, min_freq) fits one on the training text;
# ("fixed", state) uses a given one (a checkpoint's, when a run resumes).
Spec = tuple


def _worker_spec(state: dict[str, Any]) -> tuple[str, Any]:
    """What workers need to tokenise with a known tokenizer (see rnnkit.data.prepare)."""
    return ("ids", state) if "model" in state else ("split", state["kind"])


# ---------------------------------------------------------------------- parallel text
def prepare_pairs(writer: StoreWriter, workers: int, train: tuple[str, str], valid: tuple[str, str],
                  sides: dict[str, Spec], max_len: int) -> dict[str, Any]:
    """Training and validation pairs of ``train``/``valid`` (source, target) files: arrays
    ``train.src``, ``train.tgt`` (with batching keys) and ``valid.src``, ``valid.tgt``. Pairs
    with an empty side, and training pairs over ``max_len`` tokens, are dropped with a note."""
    pieces = _aligned(*train)
    sides = {name: _subwords_fitted(spec, path) for (name, spec), path in zip(sides.items(), train)}
    notes: list[str] = []
    states = _write_pairs(writer, workers, "train", pieces, sides, max_len, notes)
    fixed = {name: ("fixed", state) for name, state in states.items()}
    _write_pairs(writer, workers, "valid", _aligned(*valid), fixed, None, notes)
    return {"tokenizers": {name: writer.tokenizer(name, state) for name, state in states.items()}, "notes": notes}


def _aligned(src: str, tgt: str) -> list[tuple[Piece, Piece]]:
    every = chunk_lines(src, tgt)              # the same lines in both files' chunks
    (a, n), (b, m) = cut_lines(src, every=every), cut_lines(tgt, every=every)
    if n != m:
        raise DataError(f"{src} has {n} lines but {tgt} has {m}; parallel files must be aligned line by line")
    return list(zip(a, b))


def _subwords_fitted(spec: Spec, path: str) -> Spec:
    """Sentencepiece is fitted before the workers start (on a bounded sample of the side's
    lines); word and character vocabularies are fitted from the workers' counts."""
    if spec[0] == "fit" and spec[1] in ("bpe", "unigram"):
        return ("fixed", SentencePieceSplitter.train(stream_lines(path), spec[1], spec[2] or 8000).state())
    return spec


def _write_pairs(writer: StoreWriter, workers: int, split: str, pieces: list[tuple[Piece, Piece]],
                 sides: dict[str, Spec], max_len: int | None, notes: list[str]) -> dict[str, dict]:
    tmp = str(writer.tmp)
    specs = {name: _worker_spec(spec[1]) if spec[0] == "fixed" else ("split", spec[1]) for name, spec in sides.items()}
    jobs = [Job([("src", a), ("tgt", b)], tmp, True, a.lines) for a, b in pieces]
    parts = []
    counts: dict[str, dict[str, int]] = {"src": {}, "tgt": {}}
    for chunk in run_jobs(jobs, specs, workers, f"prepare {split}"):
        for name, part in zip(("src", "tgt"), chunk):
            if sides[name][0] == "fit":
                merge_counts(counts[name], part)
        parts.append(chunk)
    states = {}
    for name in ("src", "tgt"):
        if sides[name][0] == "fixed":
            states[name] = sides[name][1]
        else:
            _, kind, vocab_size, min_freq = sides[name]
            states[name] = {"kind": kind, "vocab": Vocab.from_counts(counts[name], SPECIALS, min_freq,
                                                                     vocab_size).itos}
    counts.clear()
    tokenizers = {name: tokenizer_from_state(state) for name, state in states.items()}
    key = None if max_len is None else np.dtype(np.uint8 if max_len < 255 else np.uint16)   # max(src, tgt + 1)
    out = {name: writer.array(f"{split}.{name}", token_dtype(len(tokenizers[name].vocab)),
                              keys=key if name == "src" else None) for name in ("src", "tgt")}
    total = empty = long = 0
    for src_part, tgt_part in parts:
        (s, ls), (t, lt) = (read_part(p, tokenizers[n].vocab.stoi, tokenizers[n].vocab.unk)
                            for n, p in (("src", src_part), ("tgt", tgt_part)))
        keep = (ls > 0) & (lt > 0)
        empty += int((~keep).sum())
        if max_len is not None:
            short = (ls <= max_len) & (lt <= max_len)
            long += int((keep & ~short).sum())
            keep &= short
        total += len(ls)
        out["src"].add(s[np.repeat(keep, ls)], ls[keep], np.maximum(ls, lt + 1)[keep] if key is not None else None)
        out["tgt"].add(t[np.repeat(keep, lt)], lt[keep])
    if empty or long:
        what = f"{long} over data.max_len={max_len} tokens, " if max_len is not None else ""
        notes.append(f"dropped {empty + long} of {total} sentence pairs ({what}{empty} with an empty side)")
    return states


# ---------------------------------------------------------------------- text streams
def prepare_stream(writer: StoreWriter, workers: int, splits: dict[str, tuple[str, int, int | None]],
                   tokenizer: str, spec: Spec) -> dict[str, Any]:
    """Language-model text: each split (file, first byte, end byte) as one stream of ids
    (array ``NAME``), the vocabulary fitted on ``train`` (or given: ``("fixed", itos)``)."""
    specials = [UNK] + ([EOS] if tokenizer == "word" else [])
    fit = spec[0] == "fit"
    kind = f"lm-{tokenizer}"
    specs = {"train": ("split", kind)}
    pieces = _pieces(*splits["train"])
    parts = []
    counts: dict[str, int] = {}
    jobs = [Job([("train", p)], str(writer.tmp), False, p.lines) for p in pieces]
    for (part,) in run_jobs(jobs, specs, workers, "prepare train"):
        if fit:
            merge_counts(counts, part)
        parts.append(part)
    itos = Vocab.from_counts(counts, specials, *spec[1:]).itos if fit else list(spec[1])
    counts.clear()
    vocab = Vocab(itos)
    dtype = token_dtype(len(vocab))
    out = writer.array("train", dtype)
    for part in parts:
        ids, lengths = read_part(part, vocab.stoi, vocab.unk)
        out.add(ids, lengths)
    fixed = {"split": ("split", kind)}
    for name, where in splits.items():
        if name == "train":
            continue
        out = writer.array(name, dtype)
        jobs = [Job([("split", p)], str(writer.tmp), False, p.lines) for p in _pieces(*where)]
        for (part,) in run_jobs(jobs, fixed, workers, f"prepare {name}"):
            out.add(*read_part(part, vocab.stoi, vocab.unk))
    return {"tokenizers": {"vocab": {"kind": tokenizer, "vocab": itos, "size": len(itos)}}, "notes": []}


def _pieces(path: str, start: int, end: int | None) -> list[Piece]:
    if end is not None and end <= start:
        return []
    return cut_lines(path, start, end, allow_empty=True)[0]


def char_cuts(path: str, fractions: list[float]) -> list[int]:
    """Byte offsets that cut a UTF-8 file into consecutive parts by fractions of its characters
    (as slicing the decoded text would), counted in one streaming pass."""
    lead = lambda block: (np.frombuffer(block, np.uint8) & 0xC0) != 0x80   # noqa: E731  a character's first byte
    chars = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            chars += int(np.count_nonzero(lead(block)))
    targets, at = [], 0
    for f in fractions:
        at += int(chars * f)
        targets.append(at)
    cuts, seen, pos = [], 0, 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            firsts = np.flatnonzero(lead(block))
            while len(cuts) < len(targets) and targets[len(cuts)] < seen + len(firsts):
                cuts.append(pos + int(firsts[targets[len(cuts)] - seen]))
            seen += len(firsts)
            pos += len(block)
    size = os.path.getsize(path)
    return cuts + [size] * (len(targets) - len(cuts))
