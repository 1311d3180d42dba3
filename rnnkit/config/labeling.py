"""The configs of ``task: tagging`` (a label per word) and ``task: classification`` (a label per
sentence): bidirectional encoders that may start from, or read features of, pretrained LMs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rnnkit.config.core import (MAX_DIM, MAX_LAYERS, MAX_VOCAB, Config, ConfigError, RecurrentConfig, check_metric,
                                check_recurrent, num, require_file)

TAGGING_METRICS = ("valid_loss", "valid_accuracy", "valid_f1")
CLASSIFICATION_METRICS = ("valid_loss", "valid_accuracy", "valid_macro_f1")


@dataclass
class EncoderConfig(RecurrentConfig):
    """What a tagger's and a classifier's bidirectional word encoder share."""

    word_dropout: float = num(0.0, 0, 1, hi_open=True)
    """Training words replaced by `<unk>` with this probability, so the model learns what to do with unseen words."""
    weight_drop: float = num(0.0, 0, 1, hi_open=True)
    """DropConnect on the hidden-to-hidden weights (fused layers)."""
    locked_dropout: bool = False
    """Dropout between layers with one mask per sentence."""
    init_from: Optional[str] = None
    """A word LM's checkpoint: word vectors and forward recurrent layers start from it (ULMFiT)."""
    init_from_backward: Optional[str] = None
    """A backward word LM's checkpoint (`data.reverse`): the backward direction starts from it."""
    init_layers: Optional[int] = num(None, 0, MAX_LAYERS)
    """Recurrent layers `init_from` copies; null: all; 0: the word vectors only."""
    freeze_embeddings: bool = False
    """Never update the word vectors (with `init_from`: the LM's stay as they are)."""
    lm_features: list[str] = field(default_factory=list)
    """Frozen LM checkpoints (word or character, either direction) whose states join the word vectors (Flair, ELMo)."""
    lm_features_cache_mb: float = num(2048.0, 0)
    """Training keeps each seen sentence's LM features up to this many MB (0: recompute every time)."""
    lm_features_size: Optional[int] = num(None, 1, MAX_DIM)
    """A trained projection of the LM features to this width; null: none."""
    lm_features_layers: Literal["top", "all"] = "top"
    """Each LM's top layer, or a learned mix of all its layers (ELMo's scalar mix; fused LMs)."""


@dataclass
class TaggingDataConfig:
    """Tagged sentences: CoNLL-U or plain columns."""

    format: Literal["conllu", "columns"] = "conllu"
    """`conllu`, or `columns`: tab- or space-separated, `#` comments, a blank line between sentences."""
    train: Optional[str] = None
    """The training file."""
    valid: Optional[str] = None
    """The validation file."""
    train_range: Optional[list[int]] = None
    """[first, last) sentences of the training file; null: all."""
    valid_range: Optional[list[int]] = None
    """[first, last) sentences of the validation file; null: all."""
    token_column: int = num(2, 1)
    """The words' column, counting from 1 (CoNLL-U: 2 is FORM)."""
    tag_column: int = num(4, 1)
    """The tags' column, counting from 1 (CoNLL-U: 4 is UPOS, 5 XPOS)."""
    lowercase: bool = False
    """Word vectors of lowercased words (the character encoder keeps case)."""
    min_freq: int = num(1, 1)
    """Rarer training words become `<unk>`."""
    max_vocab: Optional[int] = num(None, 3, MAX_VOCAB)
    """Keep at most this many words, the most frequent; null: all."""
    max_word_length: int = num(30, 1)
    """Characters the character encoder reads per word."""


@dataclass
class TaggingModelConfig(EncoderConfig):
    """A BiRNN tagger with an optional character encoder and a softmax or CRF output."""

    embedding_dim: int = num(100, 1, MAX_DIM)
    """Width of the word vectors."""
    hidden_size: int = num(200, 1, MAX_DIM)
    """Units per direction."""
    num_layers: int = num(2, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    dropout: float = num(0.33, 0, 1, hi_open=True)
    """On the inputs, between layers and before the output."""
    char_encoder: bool = True
    """Build a vector from each word's letters with a character BiRNN."""
    char_embedding_dim: int = num(30, 1, MAX_DIM)
    """Width of the character vectors."""
    char_hidden_size: int = num(50, 1, MAX_DIM)
    """The character encoder's units per direction."""
    output: Literal["softmax", "crf"] = "softmax"
    """An independent softmax per word, or a linear-chain CRF (Viterbi decoding)."""


@dataclass
class ClassificationDataConfig:
    """Labelled sentences, one `label<TAB>text` per line, or labelled documents of sentences."""

    format: Literal["lines", "documents"] = "lines"
    """`lines`: one `label<TAB>text` per line; `documents`: documents made of sentences, JSON Lines (`{"label": ..., "sentences": [...]}`) or a CoNLL-U file (`.conllu`, with `label_from`)."""
    train: Optional[str] = None
    """The training file."""
    valid: Optional[str] = None
    """The validation file."""
    label_from: Optional[Literal["newdoc_prefix"]] = None
    """CoNLL-U documents: where each document's label comes from; `newdoc_prefix`: the part of its `# newdoc id` before the first dash."""
    max_sentences: Optional[int] = num(None, 1)
    """Documents: each keeps its first this many sentences; null: all."""
    lowercase: bool = False
    """Lowercase the words."""
    min_freq: int = num(1, 1)
    """Rarer training words become `<unk>`."""
    max_vocab: Optional[int] = num(None, 3, MAX_VOCAB)
    """Keep at most this many words, the most frequent; null: all."""


@dataclass
class ClassificationModelConfig(EncoderConfig):
    """A BiRNN encoder pooled into one vector per sentence, then a label."""

    embedding_dim: int = num(300, 1, MAX_DIM)
    """Width of the word vectors."""
    hidden_size: int = num(150, 1, MAX_DIM)
    """Units per direction."""
    num_layers: int = num(1, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    dropout: float = num(0.5, 0, 1, hi_open=True)
    """On the inputs, between layers and on the pooled vector."""
    pooling: Literal["final", "mean", "max", "attention"] = "max"
    """How the word states become one vector: the final states, their mean, their maximum, or attention weights."""
    attention_hops: int = num(1, 1, 64)
    """With `pooling: attention`: weighted means side by side, each with weights of its own (Lin et al.'s hops); 1: one weighted mean."""
    hierarchical: bool = False
    """Documents: a word encoder with word attention builds each sentence's vector, a sentence encoder with sentence attention the document's (Yang et al.'s hierarchical attention network); false: the document's words read as one sequence."""


def check_classification(cfg: Config) -> None:
    """The classifier's own rules: attention hops, documents and the hierarchical network."""
    d, m, t = cfg.data, cfg.model, cfg.train
    if m.attention_hops > 1 and m.pooling != "attention" and not m.hierarchical:
        raise ConfigError("model.attention_hops", f"{m.attention_hops} hops need model.pooling: attention "
                                                  f"(it is {m.pooling})")
    if m.hierarchical and m.attention_hops > 1:
        raise ConfigError("model.attention_hops", "the hierarchical network attends once at each level; "
                                                  "hops are for the flat classifier")
    if t.attention_penalty and m.attention_hops == 1:
        raise ConfigError("train.attention_penalty", "needs model.attention_hops above 1: one hop's penalty is "
                                                     "the same whatever it attends to")
    if m.hierarchical and m.lm_features:
        raise ConfigError("model.lm_features", "the hierarchical network reads word vectors only; LM features "
                                               "are for the flat classifier")
    if m.hierarchical and d.format != "documents":
        raise ConfigError("model.hierarchical", "needs data.format: documents (sentences grouped into documents)")
    if d.format != "documents":
        for key in ("label_from", "max_sentences"):
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key}", "is for data.format: documents")
    else:
        for key in ("train", "valid"):
            path = getattr(d, key)
            if path and str(path).endswith(".conllu") and d.label_from is None:
                raise ConfigError("data.label_from", f"data.{key} is CoNLL-U: say where each document's label "
                                                     f"comes from (newdoc_prefix)")
    check_files(cfg, CLASSIFICATION_METRICS)


def check_files(cfg: Config, metrics: tuple[str, ...]) -> None:
    check_recurrent(cfg.model, "model")
    check_metric(cfg, metrics)
    require_file("data.train", cfg.data.train)
    require_file("data.valid", cfg.data.valid)
    for key in ("train_range", "valid_range"):
        span = getattr(cfg.data, key, None)
        if span is not None and (len(span) != 2 or span[0] < 0 or span[1] <= span[0]):
            raise ConfigError(f"data.{key}", f"expected [first, last) with 0 <= first < last, got {span!r}")
