"""A recurrent forecaster: an RNN encoder reads the input window a segment at a time; a
linear head maps its final state to the whole horizon at once ("direct"), or a recurrent
decoder rolls the horizon out a segment per step, fed the previous segment (the truth
under teacher forcing, else its own forecast).

Two choices that matter on real series (both from the forecasting literature):
- ``channels: independent`` forecasts each target column from its own history alone with
  shared weights (PatchTST's channel independence); ``joint`` reads all columns at once.
- ``instance_norm`` removes each window's level before the network sees it and adds it back
  to the forecast: ``last`` subtracts the window's last value, ``mean_std`` standardises the
  window (RevIN without the affine part), so a shift between training and test years does
  not move the inputs out of the range the network was trained on.
"""
from __future__ import annotations

import torch
from torch import nn

from rnnkit.config import recurrent_options
from rnnkit.models.dropout import Dropout
from rnnkit.models.rnn import make_rnn, rnn_step, state_output, step_masks


class Forecaster(nn.Module):
    def __init__(self, n_inputs: int, targets: list[int], m, input_length: int, horizon: int):
        super().__init__()
        self.targets, self.horizon, self.seg = list(targets), horizon, m.segment
        self.independent = m.channels == "independent"
        self.instance_norm, self.recurrent = m.instance_norm, m.decoder == "recurrent"
        width_in = 1 if self.independent else n_inputs
        self.width_out = 1 if self.independent else len(targets)
        opts = recurrent_options(m)
        self.encoder = make(m, self.seg * width_in, opts)
        self.dropout = Dropout(m.dropout)
        if self.recurrent:
            self.decoder = make(m, self.seg * self.width_out, opts)
            self.head = nn.Linear(m.hidden_size, self.seg * self.width_out)
        else:
            self.head = nn.Linear(m.hidden_size, horizon * self.width_out)

    # ------------------------------------------------------------------ shapes
    def _normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, L, C) -> normalised x, shift (N, 1, C), scale (N, 1, C)."""
        if self.instance_norm == "last":
            shift = x[:, -1:].detach()
            return x - shift, shift, torch.ones_like(shift)
        if self.instance_norm == "mean_std":
            shift = x.mean(1, keepdim=True).detach()
            scale = (x.var(1, keepdim=True, unbiased=False) + 1e-5).sqrt().detach()
            return (x - shift) / scale, shift, scale
        ones = torch.ones_like(x[:, :1])
        return x, torch.zeros_like(ones), ones

    def _series(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> what the network reads: (B*C, T, 1) when channels are independent."""
        if not self.independent:
            return x
        b, t, c = x.shape
        return x.transpose(1, 2).reshape(b * c, t, 1)

    def _unseries(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        if not self.independent:
            return y
        n, t, _ = y.shape
        return y.reshape(batch, n // batch, t).transpose(1, 2)

    def _segments(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, W) -> (N, T / seg, seg * W): one recurrent step per segment."""
        n, t, w = x.shape
        return x.reshape(n, t // self.seg, self.seg * w)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, truth: torch.Tensor | None = None,
                teacher_forcing: float = 0.0) -> torch.Tensor:
        """Inputs (B, L, C) -> forecasts (B, H, len(targets)), all standardised. ``truth``
        (B, H, len(targets)) feeds the recurrent decoder with probability ``teacher_forcing``."""
        batch = x.size(0)
        if self.independent:
            x = x[..., self.targets]
        x, shift, scale = self._normalise(x)
        if not self.independent:
            shift, scale = shift[..., self.targets], scale[..., self.targets]
        _, state = self.encoder(self._segments(self._series(x)))
        if self.recurrent:
            last = x[:, -self.seg:] if self.independent else x[:, -self.seg:, self.targets]
            gold = None if truth is None or teacher_forcing <= 0 else self._series((truth - shift) / scale)
            y = self._roll_out(self._series(last), state, gold, teacher_forcing)
        else:
            top = state_output(self.encoder, state)[-1]
            y = self.head(self.dropout(top)).reshape(-1, self.horizon, self.width_out)
        return self._unseries(y, batch) * scale + shift

    def _roll_out(self, last: torch.Tensor, state, gold: torch.Tensor | None, ratio: float) -> torch.Tensor:
        """Decode the horizon a segment per step from the input's last segment ``last`` (N, seg, W)."""
        n, steps = last.size(0), -(-self.horizon // self.seg)
        masks = step_masks(self.decoder, n, last)
        prev, outs = last.reshape(n, -1), []
        for i in range(steps):
            h, state = rnn_step(self.decoder, prev, state, masks)
            out = self.head(self.dropout(h))
            outs.append(out)
            if gold is not None and i + 1 < steps:
                true = gold[:, i * self.seg:(i + 1) * self.seg].reshape(n, -1)
                keep = torch.rand(n, 1, device=out.device) < ratio
                prev = torch.where(keep, true, out)
            else:
                prev = out
        return torch.cat(outs, 1).reshape(n, steps * self.seg, self.width_out)[:, :self.horizon]


def make(m, input_size: int, opts: dict) -> nn.Module:
    return make_rnn(m.cell, input_size, m.hidden_size, m.num_layers, m.dropout, **opts)
