"""rnnkit's newer cells against the published implementations, weights copied across:
``mingru-pytorch`` (minGRU, minLSTM: the log-space scan and the one-step mode),
``recurrentgemma`` (Griffin's PyTorch RG-LRU) and ``xlstm`` (its native PyTorch sLSTM and
mLSTM: the parallel form and the recurrent step). Each test skips, saying so, where its
package is not installed (``pip install -e .[refs]``)."""
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


def _xlstm_backends():
    return pytest.importorskip("xlstm.blocks.mlstm.backends", reason="xlstm is not installed (the refs extra)")


def test_mlstm_matches_xlstm_native_backend():
    """Their parallel form and their recurrent step (fed the same projections, gates and
    state) against rnnkit's chunkwise form and step, float32."""
    backends = _xlstm_backends()
    from rnnkit.models.xlstm import MLSTMCell, head_norm, mlstm_chunkwise

    torch.manual_seed(0)
    cell = MLSTMCell(12, 32, heads=4)
    with torch.no_grad():
        cell.proj.weight.normal_(0, 0.5)       # gates that move, not xLSTM's zero start
    b, t, k, d = 3, 40, 4, 8
    x = torch.randn(b, t, 12)
    with torch.no_grad():
        q, key, v, o, i_pre, log_f = cell._parts(x)
        p = cell.proj(x)
        f_pre = p[..., 4 * 32 + k:]
        heads = lambda z: z.transpose(1, 2)      # noqa: E731
        zero = (torch.zeros(b, k, d, d), torch.zeros(b, k, d), torch.zeros(b, k))
        ours, _ = mlstm_chunkwise(heads(q), heads(key), heads(v), heads(i_pre), heads(log_f), *zero, chunk=16)
        # theirs scales the keys itself: hand it the unscaled ones
        theirs = backends.parallel_stabilized_simple(heads(q), heads(key) * d ** 0.5, heads(v),
                                                     heads(i_pre).unsqueeze(-1), heads(f_pre).unsqueeze(-1), eps=0.0)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
        # their step, from zero, against the cell's step, position by position
        state = cell._pack(torch.zeros(b, 32), *zero)
        c, n, m = torch.zeros(b, k, d, d), torch.zeros(b, k, d, 1), torch.zeros(b, k, 1, 1)
        for s in range(6):
            h, state = cell.step(x[:, s], state)
            r, (c, n, m) = backends.recurrent_step_stabilized_simple(
                c, n, m, q[:, s].unsqueeze(2).clone(), (key[:, s] * d ** 0.5).unsqueeze(2).clone(),
                v[:, s].unsqueeze(2).clone(), i_pre[:, s, :, None, None], f_pre[:, s, :, None, None], eps=0.0)
            assert torch.allclose(h, o[:, s] * head_norm(r.squeeze(2), cell.head_norm), atol=1e-5, rtol=1e-5)


def test_slstm_matches_xlstm_native_backend():
    """Their vanilla sLSTM recurrence (gate order i, f, z, o; state [y, c, n, m], the layout
    rnnkit carries; recurrent blocks per head) over a sequence, weights copied, float32."""
    pytest.importorskip("xlstm", reason="xlstm is not installed (the refs extra)")
    from xlstm.blocks.slstm.src.vanilla import slstm_forward, slstm_pointwise_function_registry

    from rnnkit.models.rnn import make_rnn

    torch.manual_seed(1)
    rnn = make_rnn("slstm", 10, 16, 1, heads=4)
    cell = rnn.cell_l0
    x = torch.randn(3, 30, 10)
    with torch.no_grad():
        ours, final = rnn(x)
        wx = cell.inp(x) - cell.inp.bias          # their bias is added in the pointwise step
        states = torch.zeros(4, 3, 16)
        all_states, last, _ = slstm_forward(wx.transpose(0, 1), states, cell.rec, cell.inp.bias,
                                            slstm_pointwise_function_registry["slstm"])
    assert torch.allclose(ours, all_states[0, 1:].transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert torch.allclose(final[0], last.permute(1, 0, 2).reshape(3, -1), atol=1e-5, rtol=1e-5)
