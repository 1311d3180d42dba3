"""Sentence tokenizers for parallel text (whitespace words, characters, sentencepiece
subwords). Free of torch, so the workers that prepare a corpus start quickly."""
from __future__ import annotations

import io
from typing import Iterable, Sequence

from rnnkit.data.vocab import BOS, EOS, PAD, UNK, DataError, Vocab

SPECIALS = [PAD, UNK, BOS, EOS]   # pad is id 0 on both sides
SPM_SAMPLE = 1_000_000            # sentencepiece trains on at most this many sentences (a uniform sample)


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


SPLITTERS = {"word": WordSplitter, "char": CharSplitter}


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
        """Fit on ``lines`` (any iterable, read once): at most :data:`SPM_SAMPLE` of the non-empty
        ones, drawn uniformly by sentencepiece, so a corpus of any size trains in bounded memory."""
        import sentencepiece as spm

        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(ln for ln in lines if ln.strip()), model_writer=buf,
                model_type=kind, vocab_size=vocab_size, character_coverage=1.0,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
                input_sentence_size=SPM_SAMPLE, shuffle_input_sentence=True,
                minloglevel=2, num_threads=2)
        except RuntimeError as err:
            raise DataError(f"sentencepiece could not train a {kind} model: {err}") from None
        return cls(buf.getvalue(), kind)

    def split(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)      # the vocabulary's ids are sentencepiece's

    def join(self, tokens: Sequence[str]) -> str:
        return self.sp.decode_pieces(list(tokens))

    def state(self) -> dict:
        return {"kind": self.kind, "model": self.model}


def tokenizer_from_state(state: dict) -> SentenceTokenizer:
    if state["kind"] in ("bpe", "unigram"):
        return SentencePieceSplitter(state["model"], state["kind"])
    return SPLITTERS[state["kind"]](Vocab(state["vocab"]))
