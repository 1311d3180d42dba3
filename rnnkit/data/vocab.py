"""Vocabularies and the simple tokenizers (characters, whitespace words)."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping, Sequence

UNK, PAD, BOS, EOS = "<unk>", "<pad>", "<s>", "</s>"
MAX_LINE_CHARS = 100_000           # a longer "sentence" is a broken file, not a sentence


class Vocab:
    """A fixed list of tokens; unknown tokens map to ``<unk>``."""

    def __init__(self, tokens: list[str]):
        if UNK not in tokens:
            raise ValueError("a vocabulary needs the <unk> token")
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in vocabulary")
        self.unk = self.stoi[UNK]

    @classmethod
    def build(cls, tokens: Iterable[str], specials: list[str], min_freq: int = 1,
              max_size: int | None = None) -> "Vocab":
        """Most frequent first (ties in first-seen order), after ``specials``."""
        return cls.from_counts(Counter(tokens), specials, min_freq, max_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], specials: list[str], min_freq: int = 1,
                    max_size: int | None = None) -> "Vocab":
        """As :meth:`build`, from token counts whose order is the tokens' first-seen order."""
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: keeps first-seen order
        words = [t for t, c in ranked if c >= min_freq and t not in specials]
        if max_size is not None:
            words = words[: max(0, max_size - len(specials))]
        return cls(specials + words)

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, self.unk)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, self.unk) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]


class CharTokenizer:
    """Every character is a token, newlines included."""

    kind = "char"

    def split(self, text: str) -> list[str]:
        return list(text)

    def join(self, tokens: list[str]) -> str:
        return "".join(tokens)


class WordTokenizer:
    """Whitespace words; the end of each line is the ``</s>`` token."""

    kind = "word"

    def split(self, text: str) -> list[str]:
        out: list[str] = []
        for line in text.splitlines():
            out.extend(line.split())
            out.append(EOS)
        return out

    def join(self, tokens: list[str]) -> str:
        text = " ".join(tokens)
        return text.replace(f" {EOS} ", "\n").replace(f" {EOS}", "\n").replace(f"{EOS} ", "\n").replace(EOS, "\n")


def make_tokenizer(kind: str) -> CharTokenizer | WordTokenizer:
    return {"char": CharTokenizer, "word": WordTokenizer}[kind]()


def check_line_lengths(lines: Sequence[str], path: str, first: int = 1) -> None:
    """One line beyond :data:`MAX_LINE_CHARS` (e.g. a file without line breaks) is an error,
    not hours of tokenising and an out-of-memory crash."""
    for number, line in enumerate(lines, start=first):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{path}: line {number} has {len(line):,} characters; lines longer than "
                            f"{MAX_LINE_CHARS:,} are not sentences (is this the right file?)")


def decode_text(raw: bytes, path: str, first_line: int = 1) -> str:
    """UTF-8 bytes of ``path`` (from line ``first_line``) as text. A NUL byte (text never holds
    one: a checkpoint, an archive) or bad UTF-8 is a DataError naming the file and line."""
    at = raw.find(b"\0")
    if at >= 0:
        line = first_line + raw[:at].count(b"\n")
        raise DataError(f"{path}: line {line}: a NUL byte; this looks like a binary file, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw[: err.start].count(b"\n")
        raise DataError(f"{path}: line {line}: bytes are not valid UTF-8") from None


def split_lines(text: str) -> list[str]:
    """Lines without their ``\\n`` (a last line needs none)."""
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def read_text(path: str) -> str:
    """Read a UTF-8 text file; a decoding error names the file and line."""
    try:
        raw = open(path, "rb").read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    return decode_text(raw, path)


class DataError(ValueError):
    """A problem with a user's data file; shown as one line, exit code 2."""


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 file without their line ends; errors name the file and line."""
    try:
        raw = open(path, "rb").read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    lines = split_lines(decode_text(raw, path))
    check_line_lengths(lines, path)
    return lines


def read_parallel(src_path: str, tgt_path: str) -> tuple[list[str], list[str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                        f"parallel files must be aligned line by line")
    return src, tgt
