"""Readers for labelled text: tagged sentences (CoNLL-U, column files) and labelled sentences.

Every problem in a file is a :class:`DataError` naming the file and the line.
"""
from __future__ import annotations

from typing import NamedTuple

from rnnkit.data.vocab import DataError, read_lines

CONLLU_COLUMNS = 10


class Tagged(NamedTuple):
    tokens: list[str]
    tags: list[str]


def read_tagged(path: str, fmt: str, token_column: int, tag_column: int) -> list[Tagged]:
    """Sentences of a CoNLL-U (``fmt`` 'conllu') or column file ('columns': tab- or
    space-separated, ``#`` comments, a blank line between sentences). Columns count from 1.
    CoNLL-U multi-word token ranges (``3-4``) and empty nodes (``8.1``) are skipped."""
    sentences: list[Tagged] = []
    tokens: list[str] = []
    tags: list[str] = []
    need = max(token_column, tag_column)
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            if tokens:
                sentences.append(Tagged(tokens, tags))
                tokens, tags = [], []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t") if fmt == "conllu" or "\t" in line else line.split()
        if fmt == "conllu":
            if len(cols) != CONLLU_COLUMNS:
                raise DataError(f"{path}: line {number}: expected {CONLLU_COLUMNS} tab-separated CoNLL-U columns, "
                                f"got {len(cols)}")
            if "-" in cols[0] or "." in cols[0]:   # multi-word token range or empty node
                continue
            if not cols[0].isdigit():
                raise DataError(f"{path}: line {number}: the ID column should be a number, got {cols[0]!r}")
        if len(cols) < need:
            raise DataError(f"{path}: line {number}: expected at least {need} columns (token in column "
                            f"{token_column}, tag in column {tag_column}), got {len(cols)}")
        token, tag = cols[token_column - 1].strip(), cols[tag_column - 1].strip()
        if not token or not tag:
            raise DataError(f"{path}: line {number}: empty token or tag")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        sentences.append(Tagged(tokens, tags))
    if not sentences:
        raise DataError(f"{path}: no sentences found")
    return sentences


class Labeled(NamedTuple):
    label: str
    tokens: list[str]


def read_labeled(path: str) -> list[Labeled]:
    """``label<TAB>text`` lines (blank lines skipped); the text is split on whitespace."""
    out = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab or not label.strip() or not text.split():
            raise DataError(f"{path}: line {number}: expected 'label<TAB>text'")
        out.append(Labeled(label.strip(), text.split()))
    if not out:
        raise DataError(f"{path}: no labelled lines found")
    return out


def select(items: list, span: list[int] | None, key: str, path: str) -> list:
    """Items [first, last) of a file's sentences (``span`` from the config), or all of them."""
    if span is None:
        return items
    first, last = span
    if last > len(items):
        raise DataError(f"{key}: [{first}, {last}) asks for sentences beyond the {len(items)} in {path}")
    return items[first:last]
