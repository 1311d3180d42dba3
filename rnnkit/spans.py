"""Spans from BIO/IOB2/BIOES tags and their precision, recall and F1.

Chunks are read as conlleval (and seqeval by default) reads them: a chunk starts at B- or
S-, at an I- or E- that follows O, E-, S- or a tag of another type, and ends before O, B-,
S-, after E- or S-, or where the type changes. So an I- without a B- starts a chunk, and
a type change inside a span splits it in two.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

Span = tuple[str, int, int]   # type, first token, last token (inclusive)


def _split(tag: str) -> tuple[str, str]:
    if tag == "O" or tag == "":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if not kind:                   # a bare type ("PER") reads as an inside tag
        return "I", prefix
    return prefix, kind


def _ends(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    return (prev in ("E", "S")
            or (prev in ("B", "I") and tag in ("B", "S", "O"))
            or (prev != "O" and prev_type != kind))


def _starts(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    return (tag in ("B", "S")
            or (prev in ("E", "S", "O") and tag in ("I", "E"))
            or (tag != "O" and prev_type != kind))


def spans(tags: Sequence[str]) -> list[Span]:
    """The chunks of one sentence's tags."""
    out: list[Span] = []
    prev, prev_type, start = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        cur, kind = _split(tag)
        if prev != "O" and _ends(prev, prev_type, cur, kind):
            out.append((prev_type, start, i - 1))
        if cur != "O" and _starts(prev, prev_type, cur, kind):
            start = i
        prev, prev_type = cur, kind
    return out


def is_span_scheme(tag_set: Iterable[str]) -> bool:
    """True when every tag is O or a B-/I-/E-/S- prefixed type (so span F1 makes sense)."""
    tags = list(tag_set)
    return any(t != "O" for t in tags) and all(t == "O" or (len(t) > 2 and t[1] == "-" and t[0] in "BIES")
                                               for t in tags)


def span_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per type and ``overall`` (micro-averaged)."""
    tp, n_pred, n_gold = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred):
        gs, ps = set(spans(g)), set(spans(p))
        for s in gs:
            n_gold[s[0]] += 1
        for s in ps:
            n_pred[s[0]] += 1
        for s in gs & ps:
            tp[s[0]] += 1
    out = {}
    for kind in sorted(set(n_gold) | set(n_pred)) + ["overall"]:
        t = sum(tp.values()) if kind == "overall" else tp[kind]
        np_ = sum(n_pred.values()) if kind == "overall" else n_pred[kind]
        ng = sum(n_gold.values()) if kind == "overall" else n_gold[kind]
        p = t / np_ if np_ else 0.0
        r = t / ng if ng else 0.0
        out[kind] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": ng}
    return out
