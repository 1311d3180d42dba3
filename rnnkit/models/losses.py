"""Cross-entropy over a large output layer without holding its logits.

``F.cross_entropy(F.linear(x, W, b), y)`` keeps the logits' log-softmax (rows x vocabulary) for
backward and builds its gradient, as large, in backward: for the shared translation model's
biggest batches that is 60 MB a tensor, the largest short-lived allocations of a step, and
each batch's size differs, so the heap fragments around them. :func:`linear_cross_entropy`
takes the layer's input instead and works through the rows a chunk at a time: in training
it computes each chunk's gradients (input, weight, bias) in the forward pass, where it has
the chunk's probabilities, and keeps only those (rows x hidden, and the layer's size); the
backward pass scales them. The same three matrix products as the unfused layer, in chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# rows at a time: 41 MB of fp32 logits for a 10,000-word vocabulary. On the shared translation
# model (2 cores) 1,024 trained 5% faster than 256 (for 40-60 MB more at the peak) and than 4,096.
CHUNK = 1024


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         ignore_index: int = -100, chunk: int = CHUNK) -> torch.Tensor:
    """The mean cross-entropy of ``x @ weight.T + bias`` (rows (R, H), weight (V, H)) against
    ``target`` (R,), rows whose target is ``ignore_index`` left out: ``F.cross_entropy``'s value
    (up to float rounding) and gradients, without the (R, V) logits in memory at once.
    Under autocast the products run in its dtype and the softmax in fp32, as unfused."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, chunk)
    with torch.no_grad():
        acc = torch.promote_types(torch.float32, x.dtype)
        total = x.new_zeros((), dtype=acc)
        for start in range(0, x.size(0), chunk):
            logits = F.linear(x[start:start + chunk], weight, bias).to(acc)
            total += _chunk_loss(logits, target[start:start + chunk], ignore_index)[0]
        return total / (target != ignore_index).sum().clamp(min=1)


def _chunk_loss(logits: torch.Tensor, y: torch.Tensor, ignore_index: int):
    """One chunk's summed loss, its log-probabilities (rows, V; a new tensor), the kept rows
    (rows, 1) and the targets as indices (rows, 1)."""
    keep = (y != ignore_index).unsqueeze(1)
    safe = y.clamp(min=0).unsqueeze(1)
    logp = torch.log_softmax(logits, -1)
    return -(logp.gather(1, safe) * keep).sum(), logp, keep, safe


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, ignore_index, chunk):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        acc = torch.promote_types(torch.float32, x.dtype)     # softmax and sums: fp32 at least
        w = weight.to(dtype)
        count = (target != ignore_index).sum()
        scale = 1.0 / count.clamp(min=1).to(acc)
        total = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty(x.shape, dtype=acc, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=x.device)
        for start in range(0, x.size(0), chunk):
            xc = x[start:start + chunk].to(dtype)
            logits = F.linear(xc, w, None if bias is None else bias.to(dtype)).to(acc)
            loss, probs, keep, safe = _chunk_loss(logits, target[start:start + chunk], ignore_index)
            del logits
            total += loss
            # d loss / d logits = (softmax - one-hot) * row, row = kept / count: the softmax - one-hot
            # in the log-probabilities' memory, and the row factor applied to the products' small
            # sides (rows x hidden) rather than to the rows x vocabulary matrix
            probs.exp_().scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
            row = keep.to(acc) * scale
            dz = probs.to(dtype)
            grad_x[start:start + chunk] = dz.mm(w).to(acc) * row
            if dtype == acc:
                grad_w.addmm_(dz.t(), xc * row)
            else:
                grad_w += dz.t().mm(xc * row.to(dtype))
            if grad_b is not None:
                grad_b += row.t().mm(probs).squeeze(0)
        ctx.save_for_backward(grad_x, grad_w, grad_w.new_zeros(0) if grad_b is None else grad_b)
        ctx.has_bias, ctx.dtypes = bias is not None, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad_out.to(grad_x.dtype)
        return ((grad_x * g).to(x_dtype) if ctx.needs_input_grad[0] else None,
                (grad_w * g).to(w_dtype) if ctx.needs_input_grad[1] else None,
                (grad_b * g).to(b_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None,
                None, None, None)
