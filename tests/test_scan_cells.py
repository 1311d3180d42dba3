"""The newer cells (minGRU, minLSTM, RG-LRU, sLSTM, mLSTM, alone and in their papers' blocks): the
parallel form, the step form and the paper's equations agree; padding, carried state, bf16."""
from __future__ import annotations

import pytest
import torch

from rnnkit.models.mingated import MinGRUCell, g
from rnnkit.models.rnn import make_rnn as _make_rnn, rnn_step, run_padded
from rnnkit.models import scan
from rnnkit.models.scan import linear_scan, sequential_scan

SCAN = ["mingru", "minlstm", "rglru"]
CELLS = SCAN + ["slstm", "mlstm", "hawk", "slstm_block", "mlstm_block"]
BLOCKED = {"hawk": "rglru", "slstm_block": "slstm", "mlstm_block": "mlstm"}     # block: true
HEADS = 2     # sLSTM and mLSTM split their state into two heads here


def make_rnn(cell: str, *args, **kwargs):
    if cell in BLOCKED:
        return _make_rnn(BLOCKED[cell], *args, block=True, **kwargs)
    return _make_rnn(cell, *args, **kwargs)


def _state(rnn, batch: int) -> torch.Tensor:
    """A state a run can reach (for xLSTM's cells a zero normaliser is not one): the final
    state after a random prefix, as a leaf."""
    prefix = torch.randn(batch, 4, rnn.input_size, dtype=torch.float64)
    with torch.no_grad():
        return rnn(prefix)[1].detach().requires_grad_()


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("start", ["h0", "zeros"])
@pytest.mark.parametrize("path", ["two-level", "one step per position"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 5, 16, 23])
def test_block_scan_equals_the_recurrence_in_values_and_gradients(steps, reverse, path, start, monkeypatch):
    """Both ways the scan runs (a CPU picks by the numbers per position) give the recurrence."""
    monkeypatch.setattr(scan, "SEQUENTIAL_WIDTH", 10**9 if path == "two-level" else 0)
    torch.manual_seed(steps)
    a = torch.rand(3, steps, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, steps, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, steps, 4, dtype=torch.float64)
    h0 = h0 if start == "h0" else None
    leaves = (a, b, h0) if h0 is not None else (a, b)
    fast, slow = linear_scan(a, b, h0, reverse), sequential_scan(a, b, h0, reverse)
    assert torch.allclose(fast, slow, atol=1e-12, rtol=0)
    for x, y in zip(_grads((fast * w).sum(), leaves), _grads((slow * w).sum(), leaves)):
        assert torch.allclose(x, y, atol=1e-12, rtol=0)


def _loss(out, final):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out * w).sum() + (final ** 2).sum()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("options", [{}, {"layer_norm": True, "residual": True}])
def test_parallel_form_equals_the_papers_equations(cell, bidirectional, options):
    """Two layers, float64: the scan over the whole sequence gives the sequential loop's
    outputs, final states and gradients (inputs, initial state, every weight) to 1e-10."""
    torch.manual_seed(0)
    rnn = make_rnn(cell, 6, 6, 2, 0.0, bidirectional, heads=HEADS, **options).double()
    x = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    h0 = _state(rnn, 3)
    leaves = [x, h0, *rnn.parameters()]
    fast, slow = rnn(x, h0), rnn.sequential(x, h0)
    for p, q in zip(fast, slow):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
    for p, q in zip(_grads(_loss(*fast), leaves), _grads(_loss(*slow), leaves)):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_step_form_equals_the_parallel_form(cell):
    """Stepping position by position (generation, search, streams) gives the scan's outputs,
    states and gradients."""
    torch.manual_seed(1)
    rnn = make_rnn(cell, 5, 8, 3, 0.0, residual=True, heads=HEADS).double()
    x = torch.randn(2, 8, 5, dtype=torch.float64, requires_grad=True)
    out, final = rnn(x)
    state = rnn.initial_state(2, x)
    stepped = []
    for t in range(8):
        h, state = rnn_step(rnn, x[:, t], state)
        stepped.append(h)
    stepped = torch.stack(stepped, 1)
    assert torch.allclose(out, stepped, atol=1e-10, rtol=0)
    assert torch.allclose(final, state, atol=1e-10, rtol=0)
    leaves = [x, *rnn.parameters()]
    for p, q in zip(_grads(_loss(out, final), leaves), _grads(_loss(stepped, state), leaves)):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
    with torch.no_grad():            # inference's step (mLSTM writes its memory in place there)
        state = rnn.initial_state(2, x)
        for t in range(8):
            h, state = rnn_step(rnn, x[:, t], state)
            assert torch.allclose(h, out[:, t], atol=1e-10, rtol=0)
        assert torch.allclose(final, state, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_never_reaches_a_state(cell, bidirectional):
    """Each row of a padded batch gives what it gives alone: outputs (zero on padding), its
    final state at its own end, and gradients; the padding's values do not matter."""
    torch.manual_seed(2)
    rnn = make_rnn(cell, 4, 6, 2, 0.0, bidirectional, heads=HEADS).double()
    lengths = torch.tensor([7, 3, 1, 5])
    x = torch.randn(4, 7, 4, dtype=torch.float64, requires_grad=True)
    out, final = run_padded(rnn, x, lengths)
    noisy = x.detach().clone()
    for row, n in enumerate(lengths):
        noisy[row, n:] = 1e3
    assert torch.allclose(run_padded(rnn, noisy, lengths)[0], out, atol=1e-12, rtol=0)
    grad = _grads(_loss(out, final), [x])[0]
    for row, n in enumerate(lengths.tolist()):
        alone = x[row:row + 1, :n].detach().requires_grad_()
        o, f = rnn(alone)
        assert torch.allclose(out[row, :n], o[0], atol=1e-10, rtol=0)
        assert torch.all(out[row, n:] == 0)
        assert torch.allclose(final[:, row], f[:, 0], atol=1e-10, rtol=0)
        w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)[row:row + 1, :n]
        g_alone = _grads((o * w).sum() + (f ** 2).sum(), [alone])[0]
        assert torch.allclose(grad[row, :n], g_alone[0], atol=1e-10, rtol=0)
        assert torch.all(grad[row, n:] == 0)


@pytest.mark.parametrize("cell", CELLS)
def test_packed_input_gives_the_padded_result(cell):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(3)
    rnn = make_rnn(cell, 4, 6, 1, 0.0, True, heads=HEADS).double()
    x, lengths = torch.randn(3, 6, 4, dtype=torch.float64), torch.tensor([2, 6, 4])
    packed_out, packed_final = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, final = run_padded(rnn, x, lengths)
    assert torch.allclose(pad_packed_sequence(packed_out, batch_first=True, total_length=6)[0], out)
    assert torch.allclose(packed_final, final)


@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_across_chunks_equals_one_long_pass(cell):
    """Truncated BPTT: a sequence run in chunks, each from the last one's final state, gives
    the outputs of one pass over the whole."""
    torch.manual_seed(4)
    rnn = make_rnn(cell, 3, 6, 2, 0.0, heads=HEADS)
    x = torch.randn(2, 30, 3)
    whole, whole_final = rnn(x)
    state, parts = None, []
    for chunk in x.split(7, 1):
        out, state = rnn(chunk, state)
        parts.append(out)
    # float32 (the float64 tests hold the forms to 1e-10): mLSTM's head norm scales a small
    # read-out up to unit size, and its rounding with it
    assert torch.allclose(torch.cat(parts, 1), whole, atol=2e-5)
    assert torch.allclose(state, whole_final, atol=2e-5)


def test_mingru_is_the_papers_update():
    """One position by hand: h = (1 - z) h_prev + z g(h~), with g(x) = x + 1/2 for x >= 0."""
    cell = MinGRUCell(2, 2)
    with torch.no_grad():
        cell.proj.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]]))
        cell.proj.bias.zero_()
    x, prev = torch.tensor([[0.5, -2.0]]), torch.tensor([[1.0, 3.0]])
    a, b = cell.coefficients(x)
    z = torch.sigmoid(x)
    expected = (1 - z) * prev + z * torch.tensor([[1.0, float(torch.sigmoid(torch.tensor(-2.0)))]])
    assert torch.allclose(a * prev + b, expected)
    assert torch.allclose(g(torch.tensor([0.0, 1.0])), torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_autocast_keeps_the_recurrence_in_fp32(cell):
    torch.manual_seed(5)
    rnn = make_rnn(cell, 8, 16, 2, 0.0, heads=HEADS)     # heads of 8: a norm over 4 numbers magnifies rounding
    x = torch.randn(2, 40, 8)
    exact, _ = rnn(x)
    with torch.autocast("cpu", torch.bfloat16):
        out, final = rnn(x)
    assert final.dtype == torch.float32
    error = (out.float() - exact).abs()
    assert error.mean() < 0.01
    # mLSTM divides by |q n|, a dot product that can cancel: a few positions move further
    assert error.max() < (0.25 if cell == "mlstm" else 0.05)


def test_keys_a_scan_cell_does_not_take_are_one_line_errors(tmp_path):
    from rnnkit.config import ConfigError, load_config
    from tests.conftest import tiny_lm_config, write_yaml

    for key, value, says in [("model.recurrent_dropout", 0.2, "no recurrent weights"),
                             ("model.weight_drop", 0.3, "no recurrent weights"),
                             ("model.impl", "explicit", "one implementation")]:
        cfg = tiny_lm_config(tmp_path)
        cfg["model"]["cell"] = "minlstm"
        section, name = key.split(".")
        cfg[section][name] = value
        with pytest.raises(ConfigError, match=says) as err:
            load_config(write_yaml(tmp_path / "c.yaml", cfg))
        assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_mlstm_chunkwise_form_is_the_same_for_any_chunk_size(chunk, monkeypatch):
    """Chunks of 1, 3 (not dividing the length), 4 and one chunk for all: the memory carried
    between chunks gives the papers' equations, values and gradients, with padding; the
    backward pass going back through the chunks 2 at a time."""
    from rnnkit.models.mlstm_chunks import MLSTMChunks
    from rnnkit.models.xlstm import MLSTMCell

    monkeypatch.setattr(MLSTMCell, "chunk", chunk)
    monkeypatch.setattr(MLSTMChunks, "GROUP", 2)
    torch.manual_seed(6)
    rnn = make_rnn("mlstm", 5, 8, 1, 0.0, heads=HEADS).double()
    x = torch.randn(2, 13, 5, dtype=torch.float64, requires_grad=True)
    h0 = _state(rnn, 2)
    fast, slow = rnn(x, h0), rnn.sequential(x, h0)
    for p, q in zip(fast, slow):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
    leaves = [x, h0, *rnn.parameters()]
    for p, q in zip(_grads(_loss(*fast), leaves), _grads(_loss(*slow), leaves)):
        assert torch.allclose(p, q, atol=1e-10, rtol=0)
    out, final = rnn(x, lengths=torch.tensor([13, 6]))
    alone, end = rnn.sequential(x[1:, :6])
    assert torch.allclose(out[1, :6], alone[0], atol=1e-10) and torch.allclose(final[:, 1], end[:, 0], atol=1e-10)


def test_mlstm_keeps_no_chunk_by_chunk_matrices_for_its_backward_pass():
    """What an mLSTM layer keeps for its backward pass, counted by autograd's saved-tensor
    hook: its inputs, outputs and the memory entering each chunk, about 11 numbers per input
    number at this size; through autograd the chunkwise form kept 52 (each chunk's (s, s)
    weights, its own memory and the entering memory twice)."""
    torch.manual_seed(8)
    rnn = make_rnn("mlstm", 32, 32, 1, 0.0, heads=4)
    x = torch.randn(2, 256, 32, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = rnn(x)
    assert out.requires_grad and sum(storages.values()) / (x.numel() * 4) < 16


@pytest.mark.parametrize("cell", ["slstm", "mlstm"])
def test_the_stabiliser_keeps_exponential_gates_finite(cell):
    """Input-gate pre-activations of 200 overflow exp in float32 (exp(89) is already inf):
    the stabilised forms stay finite and equal the float64 equations."""
    torch.manual_seed(7)
    rnn = make_rnn(cell, 4, 8, 1, 0.0, heads=HEADS)
    with torch.no_grad():
        first = rnn.cell_l0
        bias = first.inp.bias if cell == "slstm" else first.proj.bias
        gates = slice(0, 8) if cell == "slstm" else slice(32, 32 + HEADS)
        bias[gates] += 200.0
    x = torch.randn(2, 20, 4)
    with torch.no_grad():
        out, final = rnn(x)
        exact, _ = rnn.double().sequential(x.double())
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert torch.allclose(out.double(), exact, atol=1e-4)


def test_xlstm_keys_are_checked_in_one_line(tmp_path):
    from rnnkit.config import ConfigError, load_config
    from tests.conftest import tiny_lm_config, write_yaml

    for cell, key, value, says in [("mlstm", "model.cell_heads", 5, "5 does not divide it"),
                                   ("slstm", "model.recurrent_dropout", 0.2, "sLSTM does not offer it"),
                                   ("mlstm", "model.weight_drop", 0.2, "no recurrent weights"),
                                   ("slstm", "model.impl", "explicit", "one implementation"),
                                   ("mingru", "model.block", True, "rglru, mlstm, slstm \\(their papers' blocks\\)"),
                                   ("rglru", "model.chrono_init", 1000, "sets the gates of mingru and minlstm"),
                                   ("minlstm", "model.chrono_init", 1, "2 or more")]:
        cfg = tiny_lm_config(tmp_path)
        cfg["model"]["cell"] = cell
        section, name = key.split(".")
        cfg[section][name] = value
        with pytest.raises(ConfigError, match=says) as err:
            load_config(write_yaml(tmp_path / "c.yaml", cfg))
        assert key in str(err.value) and "\n" not in str(err.value)


def test_hawks_block_is_the_papers_layout():
    """One position by hand from a zero state: y = W_o (GeLU(W_g x) * h), h the RG-LRU of the
    convolution of W_u x (only its last tap sees the position; the window holds zeros)."""
    import torch.nn.functional as F

    torch.manual_seed(8)
    rnn = make_rnn("hawk", 3, 4, 1)
    block = rnn.cell_l0
    x = torch.randn(2, 1, 3)
    with torch.no_grad():
        out, final = rnn(x)
        u = block.inp(x[:, 0])
        c = block.conv.weight[:, 0, -1] * u + block.conv.bias
        a, b = block.rglru.coefficients(c)
        y = block.out(F.gelu(block.gate(x[:, 0])) * b)      # h_0 = 0: h_1 = b
    assert torch.allclose(out[:, 0], y, atol=1e-6)
    assert torch.allclose(final[0, :, :4], y, atol=1e-6) and torch.allclose(final[0, :, 4:8], b, atol=1e-6)
    assert torch.allclose(final[0, :, -4:], u, atol=1e-6)    # the window's newest input


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_chrono_initialisation_spreads_the_decays_over_the_time_scales_asked_for(cell):
    """Chrono initialisation (chrono_init: T): with a zero input each unit's decay is
    a = 1 - 1/(1 + u), u uniform in [1, T - 1]; torch's default starts every decay near 1/2."""
    torch.manual_seed(0)
    zero = torch.zeros(1, 1, 8)
    for chrono in (0, 1000):
        rnn = make_rnn(cell, 8, 4096, 1, chrono=chrono)
        a, _ = rnn.cell_l0.coefficients(zero)
        u = 1.0 / (1.0 - a.double().flatten()) - 1.0      # the time scale each unit starts with, less one
        if chrono:
            assert u.min() >= 1 - 1e-3 and u.max() <= 999 * (1 + 1e-3)
            assert abs(float(u.mean()) - 500) < 25        # uniform over [1, 999]
        else:
            assert float(u.max()) < 10


def test_xlstm_blocks_are_the_papers_layouts():
    """One position by hand from a zero state (only the convolution's last tap sees it):
    the mLSTM block's y = W_down((N(h~) + s c) SiLU(z)), q and k from c = SiLU(conv(x_m)), v
    from x_m, gates from [q, k, v]; the sLSTM block's y = s + W_down(GeLU(a) b), its i and f
    gates from c, z and o from the input."""
    import torch.nn.functional as F
    from rnnkit.models.xlstm import head_norm

    torch.manual_seed(9)
    x = torch.randn(2, 1, 8)

    def by_blocks(w, u):       # a block-diagonal map, block by block
        return torch.cat([u[:, 4 * n:4 * n + 4] @ w[n].t() for n in range(w.size(0))], -1)

    rnn = make_rnn("mlstm_block", 8, 8, 1, heads=HEADS)
    b = rnn.cell_l0
    with torch.no_grad():
        b.gates.weight.normal_()       # the initial zero weights would hide which inputs they read
        out, _ = rnn(x)
        xm, z = b.up(x[:, 0]).chunk(2, -1)
        c = F.silu(b.conv.weight[:, 0, -1] * xm + b.conv.bias)
        q, k, v = by_blocks(b.q.weight, c), by_blocks(b.k.weight, c), by_blocks(b.v.weight, xm)
        i_pre = b.gates(torch.cat([q, k, v], -1))[:, :HEADS]
        d = 8
        heads = lambda t: t.view(2, HEADS, d)      # noqa: E731
        qk = (heads(q) * heads(k)).sum(-1) / d ** 0.5 * torch.exp(i_pre)       # q^T n with n = i k / sqrt(d)
        read = qk.unsqueeze(-1) * heads(v) / qk.abs().clamp_min(1).unsqueeze(-1)
        y = b.down((head_norm(read, b.head_norm) + b.skip * c) * F.silu(z))
    assert torch.allclose(out[:, 0], y, atol=1e-5)

    rnn = make_rnn("slstm_block", 8, 8, 1, heads=HEADS)
    b = rnn.cell_l0
    with torch.no_grad():
        out, _ = rnn(x)
        u = x[:, 0]
        c = F.silu(b.conv.weight[:, 0, -1] * u + b.conv.bias)
        w, bias = b.slstm.inp.weight.chunk(4), b.slstm.inp.bias.chunk(4)
        i = torch.exp(c @ w[0].t() + bias[0])          # h_0 = 0: no recurrent term; n_1 = i
        h = torch.sigmoid(u @ w[3].t() + bias[3]) * (i * torch.tanh(u @ w[2].t() + bias[2])) / i
        s = head_norm(h.view(2, HEADS, 4), b.head_norm)
        a, g = b.ffn_up(b.ffn_norm(s)).chunk(2, -1)
        y = s + b.ffn_down(F.gelu(a) * g)
    assert torch.allclose(out[:, 0], y, atol=1e-5)
