"""Encoder-decoder: (bi)directional encoder over padded sources, bridge, attentional or classic decoder."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.attention import make_attention
from rnnkit.models.dropout import Dropout
from rnnkit.models.rnn import (LSTMSteps, SharedProduct, State, length_mask, make_rnn, rnn_step, run_padded,
                               state_output, step_masks)
from rnnkit.models.losses import linear_cross_entropy
from rnnkit.models.products import run_linear


class Encoder(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, cell: str, hidden_size: int,
                 num_layers: int, bidirectional: bool, dropout: float, rnn_options: dict | None = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.dropout = Dropout(dropout)
        self.rnn = make_rnn(cell, embedding_dim, hidden_size, num_layers, dropout, bidirectional,
                            **(rnn_options or {}))
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions

    def forward(self, src: torch.Tensor, lengths: torch.Tensor):
        """-> states (B, S, D*H), top layer's final h (B, D*H), and final c for LSTMs (or None)."""
        x = self.dropout(self.embedding(src))
        out, final = run_padded(self.rnn, x, lengths)
        c = final[1] if isinstance(final, tuple) else None
        return out, self._top(state_output(self.rnn, final)), None if c is None else self._top(c)

    def _top(self, state: torch.Tensor) -> torch.Tensor:
        layers = state.size(0) // self.directions
        top = state.view(layers, self.directions, state.size(1), state.size(2))[-1]
        return top.transpose(0, 1).reshape(state.size(1), -1)


class Bridge(nn.Module):
    """The decoder's initial state from the encoder: ``linear`` (final state), ``mean``, ``max`` or ``zeros``.
    The bridge sets the decoder's h (and an LSTM's c); a cell that carries a memory besides h
    (``state_size`` wider than ``hidden_size``: sLSTM, mLSTM) starts that memory empty."""

    def __init__(self, kind: str, encoder_size: int, hidden_size: int, num_layers: int, lstm: bool,
                 state_size: int | None = None):
        super().__init__()
        self.kind, self.hidden_size, self.num_layers, self.lstm = kind, hidden_size, num_layers, lstm
        self.rest = (state_size or hidden_size) - hidden_size
        if kind != "zeros":
            self.to_h = nn.Linear(encoder_size, hidden_size * num_layers)
            self.to_c = nn.Linear(encoder_size, hidden_size * num_layers) if lstm else None

    def summary(self, memory: torch.Tensor, mask: torch.Tensor, final_h: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            m = mask.unsqueeze(-1).to(memory.dtype)
            return (memory * m).sum(1) / m.sum(1).clamp(min=1)
        if self.kind == "max":
            return memory.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
        return final_h

    def forward(self, memory, mask, final_h, final_c) -> State:
        batch = memory.size(0)
        if self.kind == "zeros":
            h = memory.new_zeros(self.num_layers, batch, self.hidden_size + self.rest)
            return (h, torch.zeros_like(h)) if self.lstm else h
        s = self.summary(memory, mask, final_h)
        h = self._layers(torch.tanh(self.to_h(s)))
        if not self.lstm:
            return F.pad(h, (0, self.rest)) if self.rest else h
        c_source = final_c if self.kind == "linear" and final_c is not None else s
        return h, self._layers(self.to_c(c_source))

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), self.num_layers, self.hidden_size).transpose(0, 1).contiguous()


class DecoderState(NamedTuple):
    rnn: State                   # (layers, N, H) or an LSTM (h, c) pair
    feed: torch.Tensor | None    # previous attentional vector (N, H) when input feeding
    memory: torch.Tensor         # encoder states (N, S, M)
    keys: torch.Tensor           # precomputed attention keys (N, S, *)
    mask: torch.Tensor           # (N, S), True on real source tokens
    context: torch.Tensor        # fixed source summary (N, M), used without attention
    masks: list | None = None    # an explicit decoder's recurrent-dropout masks (training only)

    def select(self, index: torch.Tensor) -> "DecoderState":
        """Reorder/expand along the batch dimension (beam search)."""
        rnn = tuple(s.index_select(1, index) for s in self.rnn) if isinstance(self.rnn, tuple) \
            else self.rnn.index_select(1, index)
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        masks = None if self.masks is None else [m.index_select(0, index) for m in self.masks]
        return DecoderState(rnn, pick(self.feed), pick(self.memory), pick(self.keys), pick(self.mask),
                            pick(self.context), masks)

    def join(self, other: "DecoderState") -> "DecoderState":
        """This state's rows, then ``other``'s, sources padded to the longer (search only)."""
        if self.masks is not None or other.masks is not None:
            raise ValueError("states with recurrent-dropout masks (training) cannot be joined")
        width = max(self.mask.size(1), other.mask.size(1))
        cat = lambda a, b, dim=0: None if a is None else torch.cat([a, b], dim)  # noqa: E731
        source = lambda a, b: torch.cat([_pad_source(a, width), _pad_source(b, width)])  # noqa: E731
        rnn = tuple(cat(a, b, 1) for a, b in zip(self.rnn, other.rnn)) if isinstance(self.rnn, tuple) \
            else cat(self.rnn, other.rnn, 1)
        return DecoderState(rnn, cat(self.feed, other.feed), source(self.memory, other.memory),
                            source(self.keys, other.keys), source(self.mask, other.mask),
                            cat(self.context, other.context))

    def narrow_source(self, width: int) -> "DecoderState":
        """Source positions past ``width`` dropped (views; no row may have a real token there)."""
        if width >= self.mask.size(1):
            return self
        return self._replace(memory=self.memory[:, :width], keys=self.keys[:, :width], mask=self.mask[:, :width])


def _pad_source(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (N, S, ...) padded with zeros (False for a mask) to ``width`` source positions."""
    extra = width - t.size(1)
    if not extra:
        return t
    return torch.cat([t, t.new_zeros(t.size(0), extra, *t.shape[2:])], 1)


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, cell: str, hidden_size: int, num_layers: int,
                 dropout: float, attention: str, memory_size: int, input_feeding: bool,
                 rnn_options: dict | None = None, heads: int = 1):
        super().__init__()
        self.attention = None if attention == "none" else make_attention(attention, hidden_size, memory_size, heads)
        self.input_feeding = input_feeding and self.attention is not None
        extra = hidden_size if self.input_feeding else (memory_size if self.attention is None else 0)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.dropout = Dropout(dropout)
        self.rnn = make_rnn(cell, embedding_dim + extra, hidden_size, num_layers, dropout, **(rnn_options or {}))
        self.combine = nn.Linear(memory_size + hidden_size, hidden_size, bias=False) if self.attention else None
        self.output = nn.Linear(hidden_size, vocab_size)
        self._steps_cache: tuple | None = None    # see _token_steps

    def start(self, memory, mask, init: State, context: torch.Tensor) -> DecoderState:
        keys = self.attention.keys(memory) if self.attention is not None else memory
        feed = memory.new_zeros(memory.size(0), self.output.in_features) if self.input_feeding else None
        masks = step_masks(self.rnn, memory.size(0), memory)
        return DecoderState(init, feed, memory, keys, mask, context, masks)

    def _attend(self, h: torch.Tensor, st: DecoderState, combine: SharedProduct | None = None):
        """RNN outputs (B, T, H) -> attentional vectors (B, T, H) and weights (B, T, S), or
        (B, T, heads, S) with several heads. ``combine``: the combining layer's product for
        one step of a loop (T = 1)."""
        if self.attention is None:
            return h, None
        ctx, weights = self.attention(h, st.keys, st.memory, st.mask)
        joined = torch.cat([ctx, h], -1)
        if combine is not None:
            return torch.tanh(combine(joined.squeeze(1))).unsqueeze(1), weights
        return torch.tanh(run_linear(self.combine, joined)), weights

    def forward(self, tgt_in: torch.Tensor, st: DecoderState):
        """All steps at once, every input the gold token; needs no input feeding.

        Returns the vectors the output layer reads (B, T, H) (see :meth:`project`) and the weights."""
        assert not self.input_feeding
        x = self.dropout(self.embedding(tgt_in))
        if self.attention is None:
            x = torch.cat([x, st.context.unsqueeze(1).expand(-1, x.size(1), -1)], -1)
        h, _ = self.rnn(x, st.rnn)
        return self._attend(h, st)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Output-layer logits for decoder vectors of any leading shape."""
        return run_linear(self.output, self.dropout(features))

    def loss(self, features: torch.Tensor, gold: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Mean cross-entropy of the output layer over ``features`` (rows, H) against ``gold``,
        a chunk of rows at a time (:func:`rnnkit.models.losses.linear_cross_entropy`); a
        quantised output layer (int8 evaluation) takes the plain path."""
        if type(self.output) is not nn.Linear:
            return F.cross_entropy(self.project(features), gold, ignore_index=ignore_index)
        return linear_cross_entropy(self.dropout(features), self.output.weight, self.output.bias, gold, ignore_index)

    def advance(self, x: torch.Tensor, st: DecoderState):
        """One step from embedded inputs (N, E) -> attentional vector (N, H), next state, weights."""
        if self.input_feeding:
            x = torch.cat([x, st.feed], -1)
        elif self.attention is None:
            x = torch.cat([x, st.context], -1)
        h, rnn = rnn_step(self.rnn, x, st.rnn, st.masks)
        return self._after_rnn(h, rnn, st)

    def _after_rnn(self, h: torch.Tensor, rnn: State, st: DecoderState, combine: SharedProduct | None = None):
        out, weights = self._attend(h.unsqueeze(1), st, combine)
        out = out.squeeze(1)
        st = st._replace(rnn=rnn, feed=out if self.input_feeding else None)
        return out, st, None if weights is None else weights.squeeze(1)

    def unroll(self, x: torch.Tensor, st: DecoderState) -> torch.Tensor:
        """Input feeding over embedded gold inputs ``x`` (B, T, E) -> the vectors the output
        layer reads (B, T, H). A fused LSTM runs as :class:`LSTMSteps`, other layers step by step."""
        outs = []
        if LSTMSteps.applies(self.rnn):
            steps = LSTMSteps(self.rnn, x)
            # the combining layer's weight gradient, too, as one product after the loop
            combine = SharedProduct(self.combine.weight) if type(self.combine) is nn.Linear and self.combine.bias is None \
                else None
            for t in range(x.size(1)):
                out, st, _ = self._after_rnn(*steps.step(t, st.feed, st.rnn), st, combine)
                outs.append(out)
        else:
            for x_t in x.unbind(1):
                out, st, _ = self.advance(x_t, st)
                outs.append(out)
        return torch.stack(outs, 1)

    def step(self, tokens: torch.Tensor, st: DecoderState):
        """One step for (N,) previous tokens -> logits (N, V), next state, weights (N, S) (with
        several heads (N, heads, S)) or None."""
        steps = self._token_steps()
        if steps is None:
            out, st, weights = self.advance(self.dropout(self.embedding(tokens)), st)
        else:
            out, st, weights = self._after_rnn(*steps.step(tokens, st.feed, st.rnn), st)
        return self.project(out), st, weights

    def train(self, mode: bool = True) -> "Decoder":
        self._steps_cache = None      # frees the vocabulary's products after an evaluation
        return super().train(mode)

    def _token_steps(self) -> LSTMSteps | None:
        """For search (eval mode, no gradients) with input feeding into a fused LSTM: its
        steps with the vocabulary's embedding products prepared, kept while the weights and
        the arithmetic stay the same (a search's steps share them)."""
        if self.training or torch.is_grad_enabled() or not self.input_feeding or not LSTMSteps.applies(self.rnn) \
                or torch.onnx.is_in_onnx_export():      # a graph takes the plain step
            return None
        device = self.embedding.weight.device.type
        key = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
               *[(p.data_ptr(), p._version) for p in (self.embedding.weight, *self.rnn.parameters())])
        if self._steps_cache is None or self._steps_cache[0] != key:
            self._steps_cache = (key, LSTMSteps.for_tokens(self.rnn, self.embedding))
        return self._steps_cache[1]


class Seq2Seq(nn.Module):
    def __init__(self, encoder: Encoder, bridge: Bridge, decoder: Decoder):
        super().__init__()
        self.encoder, self.bridge, self.decoder = encoder, bridge, decoder

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> DecoderState:
        memory, final_h, final_c = self.encoder(src, lengths)
        mask = length_mask(lengths.to(src.device), src.size(1))
        init = self.bridge(memory, mask, final_h, final_c)
        return self.decoder.start(memory, mask, init, self.bridge.summary(memory, mask, final_h))

    def forward(self, src, lengths, tgt_in, teacher_forcing: float = 1.0) -> torch.Tensor:
        """Training logits (B, T, V); see :meth:`features`."""
        return self.decoder.project(self.features(src, lengths, tgt_in, teacher_forcing))

    def features(self, src, lengths, tgt_in, teacher_forcing: float = 1.0) -> torch.Tensor:
        """Decoder vectors (B, T, H) for the output layer, which the caller applies (once,
        and only where the target is not padding). Below ratio 1 each input is the model's
        own previous guess with probability ``1 - teacher_forcing`` (scheduled sampling)."""
        st = self.encode(src, lengths)
        dec = self.decoder
        if teacher_forcing >= 1.0 and not dec.input_feeding:
            return dec(tgt_in, st)[0]          # no loop over time at all
        if teacher_forcing >= 1.0:             # a loop over time for the recurrence and attention only
            return dec.unroll(dec.dropout(dec.embedding(tgt_in)), st)
        tokens = tgt_in[:, 0]
        outs = []
        for t in range(tgt_in.size(1)):
            out, st, _ = dec.advance(dec.dropout(dec.embedding(tokens)), st)
            outs.append(out)
            if t + 1 < tgt_in.size(1):
                with torch.no_grad():
                    own = dec.output(out).argmax(-1)
                keep = torch.rand(own.shape, device=own.device) < teacher_forcing
                tokens = torch.where(keep, tgt_in[:, t + 1], own)
        return torch.stack(outs, 1)
