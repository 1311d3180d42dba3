"""The linear recurrence h_t = a_t * h_(t-1) + b_t over a whole sequence at once.

Every cell whose recurrence is linear in its state (minGRU, minLSTM, RG-LRU) computes its
coefficients a_t and b_t from the inputs alone, for all positions in parallel, and hands them
here. :func:`linear_scan` solves the recurrence as a two-level scan: the sequence is cut into
blocks of about sqrt(T) positions; every block is scanned from a zero state at the same time
(one element-wise step per position of a block, over all blocks together), then the blocks'
entering states are carried across the block boundaries (one step per block), and each
position adds its block's entering state times the running product of its block's a. That is
about 2 sqrt(T) element-wise steps instead of T, each over T / sqrt(T) times more numbers.
On a CPU with enough numbers per position, one step per position in memory order is faster
(:func:`_scan` picks).

The scan only multiplies and adds: it never divides by a running product, so it needs no log
space to stay finite (Feng et al. 2024 compute their scan in log space because theirs
divides), and it takes coefficients of either sign (RG-LRU's inputs are signed).

Backward is the same scan run from the end (a recurrence of the gradients with the
coefficients shifted by one), so training keeps only a and the states: no graph per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


SEQUENTIAL_WIDTH = 4096     # on a CPU, rows x width from which one step per position is the faster scan


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """h (B, T, H) of h_t = a_t h_(t-1) + b_t: on a CPU with at least ``SEQUENTIAL_WIDTH``
    numbers per position, one fused multiply-add per position in order (it reads a and b
    and writes h once, in memory order: at length 1,024, batch 32, width 512, 2.3x faster
    than the two-level scan, whose strided passes miss the cache once the sequence outgrows
    it); on a GPU, or with few numbers per position (where a step is all overhead), the
    two-level scan."""
    if b.device.type != "cpu" or b.size(0) * b.size(2) < SEQUENTIAL_WIDTH:
        return _block_scan(a, b, h0, reverse)
    h = torch.empty_like(b)
    state = h0 if h0 is not None else b.new_zeros(b.size(0), b.size(2))
    for t in (range(b.size(1) - 1, -1, -1) if reverse else range(b.size(1))):
        state = torch.addcmul(b[:, t], a[:, t], state, out=h[:, t])
    return h


def _block_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """h (B, T, H) of h_t = a_t h_(t-1) + b_t (``reverse``: h_t = a_t h_(t+1) + b_t) from ``h0``."""
    batch, steps, width = b.shape
    block = max(1, math.isqrt(steps))
    blocks = -(-steps // block)
    pad = blocks * block - steps
    if pad:      # a = 1, b = 0 past the end: the state passes unchanged, and is cut off after
        where = (0, 0, pad, 0) if reverse else (0, 0, 0, pad)
        a, b = F.pad(a, where, value=1.0), F.pad(b, where)
    a4, b4 = a.view(batch, blocks, block, width), b.view(batch, blocks, block, width)
    h = torch.empty_like(b4)
    prod = torch.empty_like(a4)           # a's running product within the block
    order = range(block - 1, -1, -1) if reverse else range(block)
    prev = None
    for j in order:                       # every block from a zero state, all blocks together
        if prev is None:
            h[:, :, j] = b4[:, :, j]
            prod[:, :, j] = a4[:, :, j]
        else:
            torch.addcmul(b4[:, :, j], a4[:, :, j], h[:, :, prev], out=h[:, :, j])
            torch.mul(a4[:, :, j], prod[:, :, prev], out=prod[:, :, j])
        prev = j
    # the state entering each block: carried across the boundaries, one step per block
    last = prev                           # the position each block ends on (its first, in reverse)
    enter = torch.empty(batch, blocks, width, dtype=b.dtype, device=b.device)
    state = h0 if h0 is not None else b.new_zeros(batch, width)
    for n in (range(blocks - 1, -1, -1) if reverse else range(blocks)):
        enter[:, n] = state
        state = torch.addcmul(h[:, n, last], prod[:, n, last], state)
    h.addcmul_(prod, enter.unsqueeze(2))
    h = h.view(batch, blocks * block, width)
    if pad:
        h = h[:, :steps] if not reverse else h[:, pad:]
    return h


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
        h = _scan(a, b, h0, reverse)
        ctx.reverse, ctx.has_h0 = reverse, h0 is not None
        ctx.save_for_backward(a, h, h0 if h0 is not None else h.new_zeros(()))
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, h, h0 = ctx.saved_tensors
        reverse = ctx.reverse
        grad = grad.contiguous()
        # g_t = grad_t + a_(t+1) g_(t+1): the same scan from the other end, a shifted by one;
        # then dL/da_t = g_t h_(t-1), written over the shifted a (one buffer for both)
        buf = torch.empty_like(a)
        later, earlier = (slice(None, -1), slice(1, None)) if reverse else (slice(1, None), slice(None, -1))
        edge = 0 if reverse else -1
        buf[:, earlier] = a[:, later]
        buf[:, edge] = 1.0
        g = _scan(buf, grad, None, not reverse)
        torch.mul(g[:, later], h[:, earlier], out=buf[:, later])
        start = -1 if reverse else 0
        if ctx.has_h0:
            torch.mul(g[:, start], h0, out=buf[:, start])
        else:
            buf[:, start] = 0.0
        grad_a = buf
        grad_h0 = None
        if ctx.has_h0 and ctx.needs_input_grad[2]:
            first = 0 if not reverse else -1
            grad_h0 = a[:, first] * g[:, first]
        return grad_a, g, grad_h0, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """Every state h (B, T, H) of h_t = a_t * h_(t-1) + b_t, given ``a`` and ``b`` (B, T, H)
    and the state before the first position ``h0`` (B, H; zeros when None). ``reverse`` runs
    from the last position to the first (a backward direction). A position with a = 1 and
    b = 0 (padding) passes the state on unchanged."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    if h0 is not None:
        h0 = h0.to(dtype)
    if torch.onnx.is_in_onnx_export():     # a graph whose length is an input: one ONNX Loop
        h0 = h0 if h0 is not None else b.new_zeros(b.size(0), b.size(2))
        return _graph_scan()(a.flip(1), b.flip(1), h0).flip(1) if reverse else _graph_scan()(a, b, h0)
    return _LinearScan.apply(a, b, h0, reverse)


_SCRIPTED: list = []


def _graph_scan():
    """The recurrence as a scripted loop (compiled once, on the first export): traced code
    would fix the sequence's length, a scripted loop exports as a loop over any length."""
    if not _SCRIPTED:
        def loop(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            out = []
            for t in range(a.size(1)):
                h = a[:, t] * h + b[:, t]
                out.append(h)
            return torch.stack(out, 1)

        _SCRIPTED.append(torch.jit.script(loop))
    return _SCRIPTED[0]


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                    reverse: bool = False) -> torch.Tensor:
    """The same recurrence one position at a time (the definition the tests hold the scan to)."""
    state = h0 if h0 is not None else b.new_zeros(b.size(0), b.size(2))
    out = [None] * b.size(1)
    for t in (range(b.size(1) - 1, -1, -1) if reverse else range(b.size(1))):
        state = a[:, t] * state + b[:, t]
        out[t] = state
    return torch.stack(out, 1)


def widen(x: torch.Tensor) -> torch.Tensor:
    """fp32 for a half-precision tensor (a recurrence accumulates in fp32), else ``x`` itself."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def last_real(held: torch.Tensor | None, steps: int, batch: int, device) -> torch.Tensor:
    """Each row's last position that is not padding (B,), from ``held`` (B, T, 1)."""
    if held is None:
        return torch.full((batch,), steps - 1, dtype=torch.long, device=device)
    return (~held[..., 0]).long().cumsum(1).argmax(1)


class LinearCell(nn.Module):
    """A cell whose recurrence is linear in its state, h_t = a_t h_(t-1) + b_t: a subclass
    gives ``coefficients(x)`` (a_t and b_t for any number of positions at once) and
    ``sequential(x, h)`` (its paper's equations, one position at a time); this gives the
    interface every cell of :class:`rnnkit.models.stack.CellStack` answers. The state is h."""

    hidden_size: int

    @property
    def state_size(self) -> int:
        return self.hidden_size

    def run(self, x: torch.Tensor, h0: torch.Tensor, held: torch.Tensor | None,
            reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, input) -> every state (B, T, H) and the final one, in one scan. A padded
        position (``held`` (B, T, 1)) gets a = 1 and b = 0: the state passes it unchanged."""
        a, b = self.coefficients(x)
        if held is not None:
            a, b = a.masked_fill(held, 1.0), b.masked_fill(held, 0.0)
        h = linear_scan(a, b, h0, reverse)
        return h, h[:, 0] if reverse else h[:, -1]

    def step(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.coefficients(x)
        h = torch.addcmul(b, a, h)
        return h, h
