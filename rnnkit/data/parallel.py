"""Parallel text: aligned readers, per-side tokenizers (word, char, sentencepiece) and batching."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from rnnkit.data.vocab import BOS, EOS, PAD, UNK, DataError, Vocab, check_not_binary
from rnnkit.hardware import pad_rows

SPECIALS = [PAD, UNK, BOS, EOS]   # pad is id 0 on both sides
MAX_LINE_CHARS = 100_000           # a longer "sentence" is a broken file, not a sentence


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 file without their line ends; errors name the file and line."""
    try:
        raw = open(path, "rb").read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if not raw.strip():
        raise DataError(f"{path}: file is empty")
    check_not_binary(raw, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes are not valid UTF-8") from None
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    check_line_lengths(lines, path)
    return lines


def check_line_lengths(lines: Sequence[str], path: str, first: int = 1) -> None:
    """One line beyond :data:`MAX_LINE_CHARS` (e.g. a file without line breaks) is an error,
    not hours of tokenising and an out-of-memory crash."""
    for number, line in enumerate(lines, start=first):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{path}: line {number} has {len(line):,} characters; lines longer than "
                            f"{MAX_LINE_CHARS:,} are not sentences (is this the right file?)")


def read_parallel(src_path: str, tgt_path: str) -> tuple[list[str], list[str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
                        f"parallel files must be aligned line by line")
    return src, tgt


class SentenceTokenizer:
    """Splits a sentence into tokens and joins tokens back into text; owns its vocabulary."""

    kind: str
    vocab: Vocab

    def split(self, text: str) -> list[str]: ...
    def join(self, tokens: Sequence[str]) -> str: ...

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(self.split(text))

    def state(self) -> dict:
        return {"kind": self.kind, "vocab": self.vocab.itos}


class WordSplitter(SentenceTokenizer):
    kind = "word"

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    @staticmethod
    def split(text: str) -> list[str]:
        return text.split()

    def join(self, tokens: Sequence[str]) -> str:
        return " ".join(tokens)


class CharSplitter(WordSplitter):
    kind = "char"

    @staticmethod
    def split(text: str) -> list[str]:
        return list(text.strip())

    def join(self, tokens: Sequence[str]) -> str:
        return "".join(tokens)


class SentencePieceSplitter(SentenceTokenizer):
    """BPE or unigram subwords trained with sentencepiece; the model bytes travel in checkpoints."""

    def __init__(self, model: bytes, kind: str):
        import sentencepiece as spm

        self.kind, self.model = kind, model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.vocab = Vocab([self.sp.id_to_piece(i) if i >= len(SPECIALS) else SPECIALS[i]
                            for i in range(self.sp.get_piece_size())])

    @classmethod
    def train(cls, lines: Iterable[str], kind: str, vocab_size: int) -> "SentencePieceSplitter":
        import sentencepiece as spm

        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter([ln for ln in lines if ln.strip()]), model_writer=buf,
                model_type=kind, vocab_size=vocab_size, character_coverage=1.0,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
                minloglevel=2, num_threads=2)
        except RuntimeError as err:
            raise DataError(f"sentencepiece could not train a {kind} model: {err}") from None
        return cls(buf.getvalue(), kind)

    def split(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def join(self, tokens: Sequence[str]) -> str:
        return self.sp.decode_pieces(list(tokens))

    def state(self) -> dict:
        return {"kind": self.kind, "model": self.model}


def build_tokenizer(kind: str, lines: list[str], vocab_size: int | None, min_freq: int) -> SentenceTokenizer:
    """Fit a tokenizer of ``kind`` on training lines."""
    if kind in ("bpe", "unigram"):
        return SentencePieceSplitter.train(lines, kind, vocab_size or 8000)
    splitter = WordSplitter if kind == "word" else CharSplitter
    tokens = (t for line in lines for t in splitter.split(line))
    return splitter(Vocab.build(tokens, SPECIALS, min_freq, vocab_size))


def tokenizer_from_state(state: dict) -> SentenceTokenizer:
    if state["kind"] in ("bpe", "unigram"):
        return SentencePieceSplitter(state["model"], state["kind"])
    return (WordSplitter if state["kind"] == "word" else CharSplitter)(Vocab(state["vocab"]))


@dataclass
class Batch:
    src: torch.Tensor          # (B, S) source ids, padded with 0
    src_lengths: torch.Tensor  # (B,) on the CPU (packing wants it there)
    tgt_in: torch.Tensor       # (B, T) <s> y_1 .. y_n, padded
    tgt_out: torch.Tensor      # (B, T) y_1 .. y_n </s>, padded
    tokens: int                # target tokens (for loss normalisation and throughput)
    index: torch.Tensor        # (B,) positions of these sentences in the dataset
    positions: torch.Tensor    # (rows,) flat positions of real (non-pad) targets in tgt_out, see IGNORE
    gold: torch.Tensor         # (rows,) the targets at those positions; IGNORE on the rows added

    def to(self, device: torch.device) -> "Batch":
        """Copy to ``device``; on CUDA through pinned memory, without waiting for the copy."""
        if device.type == "cpu":
            return self
        cuda = device.type == "cuda"
        move = lambda t: (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)  # noqa: E731
        return Batch(move(self.src), self.src_lengths, move(self.tgt_in), move(self.tgt_out),
                     self.tokens, self.index, move(self.positions), move(self.gold))


# The output layer runs on the real target tokens only, a count that changes with every batch;
# it is rounded up to a multiple of rnnkit.hardware.ROW_MULTIPLE (see there) with copies of the
# first row whose targets are IGNORE, so the loss and its gradients are unchanged.
IGNORE = -100       # cross_entropy's ignore_index


def pad(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.zeros(len(seqs), int(lengths.max()) if len(seqs) else 0, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


def make_batch(src: Sequence[list[int]], tgt: Sequence[list[int]] | None, index: Sequence[int],
               bos: int, eos: int) -> Batch:
    s, s_len = pad(src)
    if tgt is None:
        empty = torch.zeros(len(src), 0, dtype=torch.long)
        return Batch(s, s_len, empty, empty, 0, torch.as_tensor(index), empty[0], empty[0])
    t_in, _ = pad([[bos] + t for t in tgt])
    t_out, t_len = pad([t + [eos] for t in tgt])
    positions = (t_out.view(-1) != 0).nonzero().squeeze(1)   # found on the CPU: no device sync later
    gold = pad_rows(t_out.view(-1)[positions], fill=IGNORE)
    positions = pad_rows(positions)
    return Batch(s, s_len, t_in, t_out, int(t_len.sum()), torch.as_tensor(index), positions, gold)


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int | None,
                   generator: torch.Generator | None = None, pool: int = 100) -> list[list[int]]:
    """Group indices of similar length into batches (of sentences, or of padded tokens).

    With a generator the order is random but reproducible: indices are shuffled, sorted by
    length within pools of ``pool`` batches, cut into batches, and the batches shuffled.
    """
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    chunk = pool * batch_size
    batches: list[list[int]] = []
    for start in range(0, n, chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        current: list[int] = []
        longest = 0
        for i in part:
            longest_if = max(longest, lengths[i])
            full = (len(current) >= batch_size if batch_tokens is None
                    else longest_if * (len(current) + 1) > batch_tokens)
            if current and full:
                batches.append(current)
                current, longest_if = [], lengths[i]
            current.append(i)
            longest = longest_if
        if current:
            batches.append(current)
    if generator is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches
