"""The config of ``task: lm``: character- and word-level language models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rnnkit.config.core import (MAX_DIM, MAX_LAYERS, MAX_VOCAB, Config, ConfigError, RecurrentConfig, check_metric,
                                check_recurrent, num, require_file)

METRICS = ("valid_loss", "valid_ppl", "valid_bpc")
ACTIVATION_REGULARISATION = True     # train.ar / train.tar apply to the top layer's outputs


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into tokens and windows."""

    path: Optional[str] = None
    """One text file, cut into consecutive train/valid/test parts by `split`."""
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    """Fractions of characters for train, valid and test (with `path`)."""
    train: Optional[str] = None
    """The training text, when the splits are separate files (`path` unset)."""
    valid: Optional[str] = None
    """The validation text (with `train`)."""
    test: Optional[str] = None
    """The test text (with `train`; optional)."""
    tokenizer: Literal["char", "word"] = "char"
    """`char`: every character, newlines included; `word`: whitespace words, `</s>` ends a line."""
    min_freq: int = num(1, 1)
    """Rarer training tokens become `<unk>`."""
    max_vocab: Optional[int] = num(None, 2, MAX_VOCAB)
    """Keep at most this many tokens, the most frequent; null: all."""
    bptt: int = num(64, 1)
    """Tokens per truncated-backpropagation window; the hidden state is carried across windows, detached."""
    carry_state: bool = True
    """Training: each window starts from the state the previous window of its stream ended in (detached: truncated BPTT). `false`: every window starts from a zero state, so the model learns only from `bptt` tokens of context, as evaluation from a zero state first sees it (for cells whose memory outlasts many windows, such as an mLSTM with forget gates near 1, which can otherwise lean on a state built over the whole training run). Evaluation always carries the state."""
    variable_bptt: bool = False
    """AWD-LSTM's windows: `bptt` tokens (or `bptt/2`, 5% of the time) varied by a normal draw (sd 5, at least 5); each step's learning rate scaled by its length / `bptt`."""
    reverse: bool = False
    """A backward LM: every stream read right to left (`generate` then writes what comes before)."""
    cache: bool = True
    """Keep the prepared store in the data cache, keyed by the files' contents and these settings; false: a private one, removed when the process ends."""


@dataclass
class ModelConfig(RecurrentConfig):
    """Embedding, recurrent stack and softmax layer, with the AWD-LSTM regularisers."""

    embedding_dim: int = num(128, 1, MAX_DIM)
    """Width of the token vectors."""
    hidden_size: int = num(256, 1, MAX_DIM)
    """Units per recurrent layer."""
    num_layers: int = num(2, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    dropout: float = num(0.0, 0, 1, hi_open=True)
    """On the top layer's output before the softmax layer; also the default of `input_dropout` and `layer_dropout`."""
    input_dropout: Optional[float] = num(None, 0, 1, hi_open=True)
    """On the embedded tokens; null: `dropout`."""
    layer_dropout: Optional[float] = num(None, 0, 1, hi_open=True)
    """Between recurrent layers; null: `dropout`."""
    locked_dropout: bool = False
    """The three dropouts with one mask per sequence, the same units dropped at every step (variational dropout)."""
    embedding_dropout: float = num(0.0, 0, 1, hi_open=True)
    """Whole words: each vocabulary entry is zeroed for the whole batch with this probability."""
    weight_drop: float = num(0.0, 0, 1, hi_open=True)
    """DropConnect on every hidden-to-hidden matrix (AWD-LSTM), one mask per step for all time steps; fused layers."""
    tie_weights: bool = False
    """Share the embedding and softmax matrices (a projection is added when sizes differ)."""
    output: Literal["softmax", "adaptive"] = "softmax"
    """`adaptive`: an adaptive softmax (Grave et al. 2017) whose clusters `cutoffs` bound."""
    cutoffs: list[int] = field(default_factory=lambda: [2000, 10000])
    """`output: adaptive`: the frequency ranks at which the head and each tail cluster end."""
    init_from: Optional[str] = None
    """A pretrained LM checkpoint to fine-tune: its vocabulary and every weight."""


def check_config(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    check_recurrent(m, "model")
    if m.output == "adaptive":
        if not m.cutoffs or any(b <= a for a, b in zip(m.cutoffs, m.cutoffs[1:])) or m.cutoffs[0] < 1:
            raise ConfigError("model.cutoffs", f"expected increasing positive word ranks, got {m.cutoffs!r}")
    if d.variable_bptt and d.bptt < 10:
        raise ConfigError("data.variable_bptt", f"needs data.bptt >= 10, got {d.bptt}")
    check_metric(cfg, METRICS)
    if d.path is not None and d.train is not None:
        raise ConfigError("data.train", "set either data.path (one file, split) or data.train/valid/test, not both")
    if d.path is None:
        require_file("data.train", d.train)
        require_file("data.valid", d.valid)
        if d.test is not None:
            require_file("data.test", d.test)
        return
    require_file("data.path", d.path)
    if len(d.split) != 3 or any(f < 0 for f in d.split) or d.split[0] <= 0 or d.split[1] <= 0 \
            or sum(d.split) > 1 + 1e-9:
        raise ConfigError("data.split", f"expected three fractions [train, valid, test], train and valid > 0, "
                                        f"summing to at most 1, got {d.split!r}")
