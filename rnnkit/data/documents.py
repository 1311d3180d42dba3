"""Documents made of sentences, for classifying whole documents: JSON Lines in general, and
CoNLL-U treebanks whose ``# newdoc id`` lines mark where documents begin (the label read from
the id). The sentences are grouped into documents here, as the file is read; no converted
copy is written.

Every problem in a file is a :class:`DataError` naming the file and the line.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

from rnnkit.data.labeled import CONLLU_COLUMNS
from rnnkit.data.vocab import DataError, read_lines

LABEL_SOURCES = ("newdoc_prefix",)


class Document(NamedTuple):
    sentences: list[list[str]]       # each a list of words
    label: str | None                # None where a file for prediction gives none

    @property
    def tokens(self) -> list[str]:
        """The document's words in one sequence (the flat classifier reads this)."""
        return [w for s in self.sentences for w in s]


def is_conllu(path: str) -> bool:
    return str(path).endswith(".conllu")


def read_documents(path: str, label_from: str | None = None, max_sentences: int | None = None) -> list[Document]:
    """The documents of a JSON Lines file or (``.conllu``, with ``label_from``) a CoNLL-U
    treebank; with ``max_sentences`` each keeps its first that many sentences."""
    docs = conllu_documents(path, label_from) if is_conllu(path) else jsonl_documents(path)
    if max_sentences is not None:
        docs = [d._replace(sentences=d.sentences[:max_sentences]) for d in docs]
    return docs


def parse_document(line: str, where: str, labelled: bool = True) -> Document:
    """One JSON Lines document: ``{"label": ..., "sentences": [...]}``, each sentence a string
    (split on whitespace) or a list of words; without ``labelled`` the label may be absent."""
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not a JSON object ({err.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("sentences"), list):
        raise DataError(f"{where}: expected a JSON object with a list under \"sentences\"")
    label = obj.get("label")
    if label is None and labelled:
        raise DataError(f"{where}: the document has no \"label\"")
    if label is not None and (not isinstance(label, (str, int)) or not str(label).strip()):
        raise DataError(f"{where}: \"label\" should be a non-empty string")
    sentences = []
    for s in obj["sentences"]:
        if isinstance(s, str):
            words = s.split()
        elif isinstance(s, list) and all(isinstance(w, str) for w in s):
            words = [w for w in s if w.strip()]
        else:
            raise DataError(f"{where}: each sentence should be a string or a list of words")
        if words:
            sentences.append(words)
    if not sentences:
        raise DataError(f"{where}: the document has no words")
    return Document(sentences, None if label is None else str(label).strip())


def jsonl_documents(path: str) -> list[Document]:
    docs = [parse_document(line, f"{path}: line {n}") for n, line in enumerate(read_lines(path), start=1)
            if line.strip()]
    if not docs:
        raise DataError(f"{path}: no documents found")
    return docs


def newdoc_label(doc_id: str, label_from: str) -> str:
    """The label a ``# newdoc id`` gives: with ``newdoc_prefix``, the part before its first dash."""
    return doc_id.split("-", 1)[0].strip()


def conllu_documents(path: str, label_from: str | None) -> list[Document]:
    """Sentences (the FORM column) grouped at each ``# newdoc id = ...`` line."""
    if label_from not in LABEL_SOURCES:
        raise DataError(f"{path}: CoNLL-U documents need data.label_from ({', '.join(LABEL_SOURCES)}): "
                        f"where each document's label comes from")
    docs: list[Document] = []
    sentence: list[str] = []
    start = 0                      # the line the sentence being read began on

    def close_sentence() -> None:
        if not sentence:
            return
        if not docs:
            raise DataError(f"{path}: line {start}: a sentence before the first '# newdoc id' line: "
                            f"documents cannot be told apart")
        docs[-1].sentences.append(list(sentence))
        sentence.clear()

    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            close_sentence()
            continue
        if line.startswith("#"):
            key, eq, value = line[1:].partition("=")
            if key.strip() == "newdoc id" and eq:
                close_sentence()
                label = newdoc_label(value.strip(), label_from)
                if not label:
                    raise DataError(f"{path}: line {number}: an empty document id")
                docs.append(Document([], label))
            elif key.strip() == "newdoc":
                raise DataError(f"{path}: line {number}: '# newdoc' without an id: the label comes from the id")
            continue
        cols = line.split("\t")
        if len(cols) != CONLLU_COLUMNS:
            raise DataError(f"{path}: line {number}: expected {CONLLU_COLUMNS} tab-separated CoNLL-U columns, "
                            f"got {len(cols)}")
        if "-" in cols[0] or "." in cols[0]:      # multi-word token range or empty node
            continue
        if not sentence:
            start = number
        sentence.append(cols[1])
    close_sentence()
    if not docs:
        raise DataError(f"{path}: no document breaks ('# newdoc id = ...' lines): data.format documents "
                        f"needs them in a CoNLL-U file")
    docs = [d for d in docs if d.sentences]
    if not docs:
        raise DataError(f"{path}: the documents hold no sentences")
    return docs
