"""The search backend of torch decoders (:mod:`rnnkit.decoding.search` keeps the books).

A torch decoder is a step function ``step(tokens (N,), state) -> (logits (N, V), state,
attention (N, S) or None)`` whose state has ``select(index)`` (and, to join a running
search, ``join(other)`` and ``narrow_source(width)``). The model runs on its device; only
each row's k best tokens and the attention weights come back to the host.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from rnnkit.hardware import pad_rows
from rnnkit.models import products

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any, torch.Tensor | None]]


def top_k(x: torch.Tensor, k: int, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, -1)`` of rows (R, V), faster on CPU for a vocabulary: torch's CPU topk
    sorts part of every row (about 6 us a row of 10,004 here, more than the log-softmax
    before it). The best k of a row lie in the k blocks of ``block`` columns with the highest
    maxima (or in the columns after the last whole block), so only those are sorted: 2.7x
    faster for 208 rows. Values are topk's; among equal values the index may differ."""
    rows, width = x.shape
    n = width // block
    if x.device.type != "cpu" or n <= k:
        return x.topk(k, dim=-1)
    blocks = x[:, : n * block].unflatten(1, (n, block))
    chosen = blocks.amax(-1).topk(k, dim=-1).indices                                   # (R, k)
    cand = blocks.gather(1, chosen.unsqueeze(-1).expand(rows, k, block)).flatten(1)
    cand = torch.cat([cand, x[:, n * block:]], 1)                                     # + the tail
    values, j = cand.topk(k, dim=-1)
    in_block = j < k * block
    index = torch.where(in_block, chosen.gather(1, (j // block).clamp(max=k - 1)) * block + j % block,
                        j - k * block + n * block)
    return values, index


class TorchSteps:
    """:class:`rnnkit.decoding.search.Backend` for a torch step function on ``device``.

    Under CPU autocast the rows are padded to a count oneDNN has built a bf16 kernel for
    (see :data:`rnnkit.hardware.ROW_MULTIPLE`) and the copies' results dropped; fp32 and int8
    products build no kernel per shape, so there the copies would be work for nothing."""

    def __init__(self, step: StepFn, device: torch.device):
        self._step, self.device = step, torch.device(device)
        self._rows = 0             # rows of the state, padding included
        self._real = 0             # of which the search's own

    def _padded(self) -> bool:
        return torch.is_autocast_enabled(self.device.type) or (self.device.type == "cpu" and products.ENABLED)

    @torch.no_grad()
    def step(self, tokens: np.ndarray, state: Any, k: int):
        n = tokens.size
        t = torch.from_numpy(np.ascontiguousarray(tokens, np.int64)).to(self.device)
        if self._rows > n:
            t = torch.cat([t, t[:1].expand(self._rows - n)])
        logits, state, weights = self._step(t, state)
        # log-probabilities in fp32 whatever the model computes in, in one fused pass
        logp = torch.log_softmax(logits[:n], -1, dtype=torch.float32)
        values, index = top_k(logp, min(k, logp.size(-1)))
        attention = None if weights is None else weights[:n].float().cpu().numpy()
        return values.cpu().numpy().astype(np.float64), index.cpu().numpy(), attention, state

    def select(self, state: Any, index: np.ndarray) -> Any:
        ix = torch.from_numpy(np.ascontiguousarray(index, np.int64)).to(self.device)
        if self._padded():
            ix = pad_rows(ix)
        self._rows, self._real = ix.numel(), index.size
        return state.select(ix)

    def join(self, a: Any, b: Any) -> Any:
        """``a``'s real rows (its padding copies dropped), then ``b``'s."""
        if self._rows > self._real:
            a = a.select(torch.arange(self._real, device=self.device))
        self._rows = self._real = 0       # the joined state has no padding rows
        return a.join(b)

    @staticmethod
    def narrow_source(state: Any, width: int) -> Any:
        return state.narrow_source(width) if hasattr(state, "narrow_source") else state
