"""Embedding -> stacked RNN -> softmax layer (full, optionally tied to the embedding, or
adaptive), with the AWD-LSTM regularisers as options."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import recurrent_options
from rnnkit.config.lm import ModelConfig
from rnnkit.models.dropout import dropout, embedding_dropout, locked_dropout
from rnnkit.models.products import run_linear
from rnnkit.models.rnn import State, make_rnn, rnn_step, stack_groups


class Features(NamedTuple):
    output: torch.Tensor      # (B, T, D): what the softmax layer reads (after output dropout)
    hidden: torch.Tensor      # (B, T, H): the top recurrent layer's output before dropout
    dropped: torch.Tensor     # (B, T, H): ... and after it
    state: State


class RNNLanguageModel(nn.Module):
    """``dropout`` is the output dropout and the default of ``input_dropout`` (on embedded
    words) and of the dropout between recurrent layers (``rnn_options['dropout']`` when given);
    ``locked_dropout`` makes all three one mask per sequence; ``embedding_dropout`` drops whole
    words. ``output`` ``adaptive`` is an adaptive softmax with ``cutoffs`` (ids must be ordered
    by frequency, as :class:`rnnkit.data.vocab.Vocab` orders them)."""

    def __init__(self, vocab_size: int, cell: str, embedding_dim: int, hidden_size: int,
                 num_layers: int, dropout: float, tie_weights: bool, rnn_options: dict | None = None,
                 input_dropout: float | None = None, embedding_dropout: float = 0.0,
                 locked_dropout: bool = False, output: str = "softmax", cutoffs: list[int] | None = None):
        super().__init__()
        options = {"locked_dropout": locked_dropout, **(rnn_options or {})}
        layer_dropout = options.pop("dropout", dropout)
        locked_dropout = options["locked_dropout"]
        self.adaptive, self.tied_adaptive = output == "adaptive", output == "adaptive" and tie_weights
        # a tied adaptive softmax is its own input layer: no separate embedding matrix
        self.embedding = None if self.tied_adaptive else nn.Embedding(vocab_size, embedding_dim)
        self.rnn = make_rnn(cell, embedding_dim, hidden_size, num_layers, layer_dropout, **options)
        self.p_out, self.p_in = dropout, dropout if input_dropout is None else input_dropout
        self.p_words, self.locked = embedding_dropout, locked_dropout
        width = embedding_dim if tie_weights else hidden_size
        self.proj = nn.Linear(hidden_size, embedding_dim) if tie_weights and embedding_dim != hidden_size else None
        if self.adaptive:
            self.output = nn.AdaptiveLogSoftmaxWithLoss(width, vocab_size, list(cutoffs or []), div_value=4.0)
        else:
            self.output = nn.Linear(width, vocab_size)
            if tie_weights:
                self.output.weight = self.embedding.weight

    def _drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return locked_dropout(x, p, self.training) if self.locked else dropout(x, p, self.training)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word vectors (..., E) of ``tokens``: the embedding's rows, or with a tied adaptive
        softmax its output vectors as adaptive inputs (Baevski and Auli; Grave et al.): a head
        word's row of the head matrix; a tail word's row of its cluster's output matrix
        through the transposed projection of that cluster."""
        if not self.tied_adaptive:
            return self.embedding(tokens)
        asm, flat = self.output, tokens.reshape(-1)
        head = flat < asm.shortlist_size
        vectors = asm.head.weight.new_zeros(flat.numel(), asm.in_features)
        where = head.nonzero().squeeze(1)
        vectors = vectors.index_copy(0, where, asm.head.weight[flat[where]])
        for i, (lo, hi) in enumerate(zip(asm.cutoffs[:-1], asm.cutoffs[1:])):
            where = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            project, words = asm.tail[i][0].weight, asm.tail[i][1].weight     # (h, E), (n, h)
            vectors = vectors.index_copy(0, where, words[flat[where] - lo] @ project)
        return vectors.view(*tokens.shape, -1)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Input to output: the embedding, each recurrent layer, the softmax layer."""
        return stack_groups([self.embedding], self.rnn, [self.proj, self.output])

    @property
    def vocab_size(self) -> int:
        return self.output.n_classes if self.adaptive else self.output.out_features

    def features(self, tokens: torch.Tensor, state: State | None = None) -> Features:
        """``tokens`` (B, T) -> the softmax layer's input, the top layer's output, the final state."""
        words = embedding_dropout(self.embed(tokens), tokens, self.vocab_size, self.p_words, self.training)
        x = self._drop(words, self.p_in)
        if tokens.size(1) == 1 and state is not None and not self.training and not self.rnn.bidirectional:
            # one token on (generation, a live stream): a cell step per layer, about half the
            # time of the fused layer's set-up for a sequence of one
            top, state = rnn_step(self.rnn, x[:, 0], state)
            hidden = top.unsqueeze(1)
        else:
            hidden, state = self.rnn(x, state)
        dropped = self._drop(hidden, self.p_out)
        out = dropped if self.proj is None else run_linear(self.proj, dropped)
        return Features(out, hidden, dropped, state)

    def log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary (..., V) of features ``out`` (..., D)."""
        if self.adaptive:
            shape = out.shape[:-1]
            return self.output.log_prob(out.reshape(-1, out.size(-1)).float()).view(*shape, -1)
        return F.log_softmax(run_linear(self.output, out).float(), -1)

    def target_log_probs(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) (B, T) given features ``out`` (B, T, D)."""
        return -self.loss(out, targets, reduction="none").view(targets.shape)

    def loss(self, out: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood of ``targets`` (B, T) given features ``out`` (B, T, D)."""
        flat, y = out.reshape(-1, out.size(-1)), targets.reshape(-1)
        if self.adaptive:
            # the adaptive softmax's own loss: only each target's cluster is computed
            nll = -self.output(flat, y).output
            return {"mean": nll.mean, "sum": nll.sum}.get(reduction, lambda: nll)()
        return F.cross_entropy(run_linear(self.output, flat).float(), y, reduction=reduction)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``tokens``: (batch, time) ids -> scores (batch, time, vocab) whose softmax is the
        next-token distribution (logits, or log-probabilities for the adaptive softmax), and
        the final state."""
        out, _, _, state = self.features(tokens, state)
        if self.adaptive:
            return self.log_probs(out), state
        return run_linear(self.output, out), state


def build_language_model(m: ModelConfig, vocab_size: int) -> RNNLanguageModel:
    """The language model a ``task: lm`` config's model section describes."""
    options = {**recurrent_options(m), "dropout": m.dropout if m.layer_dropout is None else m.layer_dropout}
    return RNNLanguageModel(vocab_size, m.cell, m.embedding_dim, m.hidden_size, m.num_layers, m.dropout,
                            m.tie_weights, options, input_dropout=m.input_dropout,
                            embedding_dropout=m.embedding_dropout, output=m.output, cutoffs=m.cutoffs)
