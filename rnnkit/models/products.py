"""Matrix products of fp32 models on a CPU through oneDNN.

torch's fp32 ``linear`` and ``mm`` on a CPU call MKL's sgemm. On the AMD EPYC these numbers
come from, oneDNN's inner-product kernel (the one torch already uses for bf16 and for the
fused LSTM) runs the same product 1.3-1.45x faster for the shapes a decoder step and an
output layer have (rows 5-2,048, inner 512-1,024, outer 512-10,004; one thread, measured
beside each other), and grad-input products 1.2x; MKL stays for the weight-gradient
product, where oneDNN was slower. :func:`dense` is ``x @ weight.T + bias`` that takes the
faster kernel where it applies and torch's everywhere else (other devices and dtypes,
autocast, ONNX export and tracing, products too small to repay the call's ~15 us).
``RNNKIT_ONEDNN_PRODUCTS=0`` in the environment turns the routing off, for comparisons.

Sums run in another order than MKL's, so results differ from torch's in the last bits of
fp32 (as onnxruntime's do); outputs that depend on exact ties may differ in rare cases.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# below this many multiply-adds a product is quicker through torch's own call
SMALLEST = 1 << 22


def _enabled() -> bool:
    return (os.environ.get("RNNKIT_ONEDNN_PRODUCTS", "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


ENABLED = _enabled()


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN runs ``x @ weight.T``: both plain fp32 CPU tensors, no autocast, no
    export, trace or compilation in progress, and a product large enough."""
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.layout == torch.strided and weight.layout == torch.strided and weight.dim() == 2
            and x.numel() * weight.size(0) >= SMALLEST and torch._C._get_mkldnn_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling())


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.size(-1))
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.size(0))


class _Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad_input(grad, weight)
        flat = grad.reshape(-1, grad.size(-1))
        if ctx.needs_input_grad[1]:
            gw = flat.t().mm(x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = flat.sum(0)
        return gx, gw, gb


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`applies` (differentiable)."""
    if not applies(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Dense.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` (the input's gradient of ``x @ weight.T``), not differentiable."""
    if applies(grad, weight.t()):
        return _onednn(grad, weight.t(), None)
    return grad.matmul(weight)


def run_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for an ``nn.Linear`` through :func:`dense`; any other layer (a quantised
    one in int8 inference) runs itself."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return dense(x, layer.weight, layer.bias)
