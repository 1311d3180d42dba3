"""The config of ``task: translation``: an encoder-decoder with attention over aligned files."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rnnkit.config.core import (MAX_DIM, MAX_LAYERS, MAX_VOCAB, Config, ConfigError, RecurrentConfig, check_metric,
                                check_recurrent, num, require_file)

METRICS = ("valid_loss", "valid_ppl", "valid_bleu", "valid_chrf")
Tokenizer = Literal["word", "char", "bpe", "unigram"]


@dataclass
class DataConfig:
    """Line-aligned source and target files, their tokenizers and vocabularies, and batching."""

    train_src: Optional[str] = None
    """Training sources, one sentence per line."""
    train_tgt: Optional[str] = None
    """Training targets, line-aligned with `train_src`."""
    valid_src: Optional[str] = None
    """Validation sources."""
    valid_tgt: Optional[str] = None
    """Validation targets, line-aligned with `valid_src`."""
    src_tokenizer: Tokenizer = "word"
    """`word` (whitespace), `char`, or sentencepiece's `bpe` or `unigram`, trained on the training split and kept in the checkpoint."""
    tgt_tokenizer: Tokenizer = "word"
    """The target side's tokenizer, as `src_tokenizer`."""
    src_vocab_size: Optional[int] = num(None, 8, MAX_VOCAB)
    """word/char: keep the most frequent this many; bpe/unigram: the number of pieces (default 8000)."""
    tgt_vocab_size: Optional[int] = num(None, 8, MAX_VOCAB)
    """The target side's, as `src_vocab_size`."""
    min_freq: int = num(1, 1)
    """word/char: rarer tokens become `<unk>`."""
    max_len: int = num(100, 1)
    """Training pairs with a side longer than this many tokens are dropped (and counted)."""
    batch_tokens: Optional[int] = num(None, 1)
    """Batch by padded tokens instead of `train.batch_size` sentences."""
    cache: bool = True
    """Keep the prepared store in the data cache; false: a private one, removed when the process ends."""


@dataclass
class EncoderConfig(RecurrentConfig):
    """The source side's recurrent stack."""

    hidden_size: int = num(256, 1, MAX_DIM)
    """Units per direction; both directions are concatenated."""
    num_layers: int = num(1, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    bidirectional: bool = True
    """Read the source both ways."""
    dropout: float = num(0.3, 0, 1, hi_open=True)
    """On the embeddings and between layers."""


@dataclass
class DecoderConfig(RecurrentConfig):
    """The target side's recurrent stack and its attention over the encoder's states."""

    hidden_size: int = num(512, 1, MAX_DIM)
    """Units per layer."""
    num_layers: int = num(1, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    dropout: float = num(0.3, 0, 1, hi_open=True)
    """On the embeddings, between layers and before the output layer."""
    attention: Literal["none", "dot", "general", "additive"] = "general"
    """`none` (the classic encoder-decoder: one source summary fed at every step), `dot`, `general` (bilinear, Luong) or `additive` (Bahdanau)."""
    attention_heads: int = num(1, 1, 64)
    """Heads of the chosen score side by side, each over its slice of projected queries, keys and values (multi-head attention); 1: one head over the states as they are."""
    input_feeding: bool = True
    """Feed the previous attentional vector into the next step (Luong)."""


@dataclass
class ModelConfig:
    """Embeddings, encoder, bridge and decoder."""

    embedding_dim: int = num(256, 1, MAX_DIM)
    """Width of the token vectors, both sides."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """The decoder."""
    bridge: Literal["linear", "zeros", "mean", "max"] = "linear"
    """The decoder's first state: the encoder's final state through a linear layer, zeros, or the mean or max of the encoder states through a linear layer."""
    max_len_ratio: float = num(2.0, 0, lo_open=True)
    """Decoding stops after `max_len_ratio` x source length + `max_len_extra` tokens."""
    max_len_extra: int = num(10, 0)
    """See `max_len_ratio`."""
    init_range: Optional[float] = num(None, 0, lo_open=True)
    """Initialise every weight uniformly in [-r, r] (padding embeddings stay zero); null: torch's defaults."""


def check_config(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    check_recurrent(m.encoder, "model.encoder")
    check_recurrent(m.decoder, "model.decoder")
    check_metric(cfg, METRICS)
    for key in ("train_src", "train_tgt", "valid_src", "valid_tgt"):
        require_file(f"data.{key}", getattr(d, key))
    memory = m.encoder.hidden_size * (2 if m.encoder.bidirectional else 1)
    heads = m.decoder.attention_heads
    if heads > 1:
        if m.decoder.attention == "none":
            raise ConfigError("model.decoder.attention_heads", f"{heads} heads need an attention (model.decoder."
                                                               f"attention is none)")
        for what, size in (("model.decoder.hidden_size", m.decoder.hidden_size), ("the encoder's output size", memory)):
            if size % heads:
                raise ConfigError("model.decoder.attention_heads", f"{heads} heads must divide {what} ({size}): "
                                                                   f"each head takes an equal slice")
    elif m.decoder.attention == "dot" and memory != m.decoder.hidden_size:
        raise ConfigError("model.decoder.hidden_size", f"dot attention needs it equal to the encoder's output size "
                                                       f"({memory}), got {m.decoder.hidden_size}; or use 'general'")
