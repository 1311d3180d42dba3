"""The fp32 CPU products through oneDNN (rnnkit.models.products) against torch's own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit.models import products
from rnnkit.models.rnn import LSTMSteps

pytestmark = pytest.mark.skipif(not products.ENABLED, reason="this torch build has no oneDNN inner product")


@pytest.mark.parametrize("shape", [(96, 256), (4, 24, 256)])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_takes_onednn_and_matches_linear_in_values_and_gradients(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.randn(384, 256, generator=g) * 0.1).requires_grad_()
    b = torch.randn(384, generator=g).requires_grad_() if bias else None
    assert products.applies(x, w)                      # large enough: the oneDNN kernel runs
    up = torch.randn(*shape[:-1], 384, generator=g)
    out = products.dense(x, w, b)
    assert out.grad_fn is not None and "Dense" in type(out.grad_fn).__name__
    grads = torch.autograd.grad((out * up).sum(), [t for t in (x, w, b) if t is not None])
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad((ref * up).sum(), [t for t in (x, w, b) if t is not None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(products.dense(x, w, b), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(products.grad_input(up, w), up @ w, rtol=1e-5, atol=1e-4)


def test_small_products_other_dtypes_and_autocast_take_torch():
    w = torch.randn(8, 4)
    assert not products.applies(torch.randn(2, 4), w)                          # too small
    big = torch.randn(4096, 256)
    assert not products.applies(big.double(), torch.randn(4096, 256).double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not products.applies(big, torch.randn(4096, 256))


def test_lstm_steps_through_onednn_match_the_fused_lstm_in_values_and_gradients():
    """The input-feeding decoder's step product (forward and grad-input through oneDNN) against
    nn.LSTM run on the same inputs one step at a time."""
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(64 + 192, 192, num_layers=2)
    known = torch.randn(48, 5, 64, requires_grad=True)
    feed = torch.randn(48, 5, 192)
    h0 = (torch.zeros(2, 48, 192), torch.zeros(2, 48, 192))
    assert products.applies(torch.empty(48, 384), rnn.weight_hh_l0)
    steps, state, outs = LSTMSteps(rnn, known), h0, []
    for t in range(5):
        out, state = steps.step(t, feed[:, t], state)
        outs.append(out)
    got = torch.stack(outs, 1)
    ref, _ = rnn(torch.cat([known, feed], -1).transpose(0, 1), h0)
    torch.testing.assert_close(got, ref.transpose(0, 1), rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(got.square().sum(), [known, rnn.weight_hh_l1])
    g2 = torch.autograd.grad(ref.square().sum(), [known, rnn.weight_hh_l1])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
