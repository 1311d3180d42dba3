"""rnnkit's scan cells against the published implementations, weights copied across:
``mingru-pytorch`` (minGRU, minLSTM: the log-space scan and the one-step mode) and
``recurrentgemma`` (Griffin's PyTorch RG-LRU). Each test skips, saying so, where its package
is not installed (``pip install -e .[refs]``)."""
from __future__ import annotations

import pytest
import torch

from rnnkit.models.mingated import MinGRUCell, MinLSTMCell
from rnnkit.models.rglru import RGLRUCell
from rnnkit.models.scan import linear_scan


def _ours(cell, x, h0=None):
    a, b = cell.coefficients(x)
    return linear_scan(a, b, h0)


def test_mingru_matches_mingru_pytorch():
    ref = pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed (the refs extra)")
    torch.manual_seed(0)
    theirs = ref.minGRU(16)
    ours = MinGRUCell(16, 16)
    with torch.no_grad():
        ours.proj.weight.copy_(theirs.to_hidden_and_gate.weight)     # [candidate; gate], both sides
        ours.proj.bias.zero_()
    x = torch.randn(3, 50, 16)
    with torch.no_grad():
        out = _ours(ours, x)
        assert torch.allclose(out, theirs(x), atol=1e-5, rtol=1e-5)
        # from a carried state, and their one-step mode
        h = out[:, -1]
        nxt = torch.randn(3, 1, 16)
        assert torch.allclose(_ours(ours, nxt, h), theirs(nxt, h[:, None]), atol=1e-5, rtol=1e-5)
        more = torch.randn(3, 7, 16)
        assert torch.allclose(_ours(ours, more, h), theirs(more, h[:, None]), atol=1e-5, rtol=1e-5)


def test_minlstm_matches_mingru_pytorch():
    pytest.importorskip("minGRU_pytorch", reason="mingru-pytorch is not installed (the refs extra)")
    from minGRU_pytorch.minLSTM import minLSTM

    torch.manual_seed(1)
    theirs = minLSTM(16)
    ours = MinLSTMCell(16, 16)
    hidden, f, i = theirs.to_hidden_and_f_i_gate.weight.chunk(3, 0)
    with torch.no_grad():
        ours.proj.weight.copy_(torch.cat([f, i, hidden]))             # theirs [candidate, f, i]; ours [f, i, candidate]
        ours.proj.bias.zero_()
        x = torch.randn(3, 50, 16)
        out = _ours(ours, x)
        assert torch.allclose(out, theirs(x), atol=1e-5, rtol=1e-5)
        nxt = torch.randn(3, 1, 16)
        assert torch.allclose(_ours(ours, nxt, out[:, -1]), theirs(nxt, out[:, -1:]), atol=1e-5, rtol=1e-5)


def _recurrentgemma_torch():
    """recurrentgemma's PyTorch layers, loaded without the package's ``__init__``, which
    imports its JAX half (JAX is not needed for the PyTorch one)."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("recurrentgemma")
    if spec is None:
        pytest.skip("recurrentgemma is not installed (the refs extra)")
    if "recurrentgemma" not in sys.modules:
        package = types.ModuleType("recurrentgemma")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = package
    from recurrentgemma.torch import layers

    return layers


def test_rglru_matches_recurrentgemma():
    RGLRU = _recurrentgemma_torch().RGLRU

    torch.manual_seed(2)
    width = 16
    theirs = RGLRU(width, num_heads=1)
    ours = RGLRUCell(width, width)
    with torch.no_grad():
        ours.inp.weight.copy_(torch.eye(width))      # the RG-LRU's own input is x itself
        ours.inp.bias.zero_()
        ours.gates.weight.copy_(torch.cat([theirs.a_gate.w[0].t(), theirs.input_gate.w[0].t()]))
        ours.gates.bias.copy_(torch.cat([theirs.a_gate.b[0], theirs.input_gate.b[0]]))
        ours.log_a.copy_(-theirs.a_param)            # theirs: log a = -c r softplus(p); ours: -c r softplus(-Lambda)
        x = torch.randn(2, 40, width)
        # positions from 1: theirs skips the input's normalisation at a document's first token
        positions = torch.arange(1, 41).expand(2, 40)
        y, last = theirs(x, positions)
        out = _ours(ours, x)
        assert torch.allclose(out, y, atol=1e-5, rtol=1e-5)
        assert torch.allclose(out[:, -1], last, atol=1e-5, rtol=1e-5)
        nxt = torch.randn(2, 1, width)
        y1, _ = theirs(nxt, torch.full((2, 1), 41), cache=last)
        assert torch.allclose(_ours(ours, nxt, out[:, -1]), y1, atol=1e-5, rtol=1e-5)
