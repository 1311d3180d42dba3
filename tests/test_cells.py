"""Explicit recurrent cells against torch.nn, and what only they can do."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.config import ConfigError, load_config
from rnnkit.hardware import autocast
from rnnkit.models.cells import ExplicitRNN
from rnnkit.models.language_model import RNNLanguageModel
from rnnkit.models.rnn import make_rnn, rnn_step, run_padded, step_masks
from rnnkit.models.seq2seq import Bridge, Decoder, Encoder, Seq2Seq
from rnnkit.runs import load_task, prepare_trainer
from tests.conftest import overfit_tiny_batch, tiny_lm_config, write_yaml

CELLS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]


def _pair(cell, layers, bidirectional, input_size=5, hidden=7):
    torch.manual_seed(0)
    fused = make_rnn(cell, input_size, hidden, layers, 0.0, bidirectional).double()
    explicit = make_rnn(cell, input_size, hidden, layers, 0.0, bidirectional, impl="explicit").double()
    explicit.load_state_dict(fused.state_dict())   # the same names and shapes
    return fused, explicit


def _outputs_and_grads(rnn, x, state, lengths):
    inp = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False) if lengths is not None else x
    out, final = rnn(inp, state)
    if lengths is not None:
        out = pad_packed_sequence(out, batch_first=True)[0]
    final = final if isinstance(final, tuple) else (final,)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + sum((f ** 2).sum() for f in final)
    leaves = [x, *(state if isinstance(state, tuple) else (state,))]
    grads = torch.autograd.grad(loss, leaves + list(rnn.parameters()))
    return [out, *final], grads


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_explicit_layer_equals_torch_nn_in_values_and_gradients(cell, layers, bidirectional, packed):
    fused, explicit = _pair(cell, layers, bidirectional)
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 4, 7, dtype=torch.float64, requires_grad=True)
    state = (h0, torch.randn_like(h0).requires_grad_()) if cell == "lstm" else h0
    lengths = torch.tensor([6, 2, 4, 1]) if packed else None
    values_f, grads_f = _outputs_and_grads(fused, x, state, lengths)
    values_e, grads_e = _outputs_and_grads(explicit, x, state, lengths)
    for a, b in zip(values_f, values_e):
        assert torch.allclose(a, b, atol=1e-12)
    assert len(grads_f) == len(grads_e)
    for a, b in zip(grads_f, grads_e):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padded_batches_run_as_if_packed(cell, layers, bidirectional, dtype):
    """run_padded (fused kernels on the padded batch, state held on padding) gives packing's
    outputs, final states and gradients, for inputs and weights, in both CPU kernels' dtypes."""
    torch.manual_seed(0)
    rnn = make_rnn(cell, 5, 7, layers, 0.0, bidirectional).to(dtype)
    x = torch.randn(4, 6, 5, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([6, 2, 4, 1])
    values, grads = [], []
    for packed in (True, False):
        if packed:
            out, final = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            out = pad_packed_sequence(out, batch_first=True, total_length=6)[0]
        else:
            out, final = run_padded(rnn, x, lengths)
        final = final if isinstance(final, tuple) else (final,)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        loss = (out * weights).sum() + sum((f ** 2).sum() for f in final)
        values.append([out, *final])
        grads.append(torch.autograd.grad(loss, [x, *rnn.parameters()]))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert len(values[0]) == len(values[1])
    for a, b in zip(values[0] + list(grads[0]), values[1] + list(grads[1])):
        assert a.shape == b.shape and torch.allclose(a, b, atol=tol)
    assert values[1][0][1, 2:].abs().max() == 0           # zero past a row's end


def test_padded_batches_under_bf16_autocast_stay_close_to_fp32():
    torch.manual_seed(0)
    rnn = make_rnn("lstm", 16, 32, 2, 0.0, True)
    x, lengths = torch.randn(8, 12, 16), torch.tensor([12, 3, 7, 12, 1, 9, 5, 11])
    exact, (h, c) = run_padded(rnn, x, lengths)
    with autocast("cpu", torch.bfloat16):
        low, (h16, c16) = run_padded(rnn, x, lengths)
    for a, b in ((exact, low), (h, h16), (c, c16)):
        assert (a - b.float()).abs().max() < 0.05
    assert low[1, 3:].abs().max() == 0


@pytest.mark.parametrize("cell", CELLS)
def test_one_step_at_a_time_equals_torch_nn(cell):
    fused, explicit = _pair(cell, 2, False)
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    results = []
    for rnn in (fused, explicit):
        state = torch.zeros(2, 3, 7, dtype=torch.float64)
        state = (state, state.clone()) if cell == "lstm" else state
        outs = []
        for t in range(x.size(1)):
            out, state = rnn_step(rnn, x[:, t], state)
            outs.append(out)
        loss = torch.stack(outs, 1).pow(2).sum()
        results.append((torch.stack(outs, 1), torch.autograd.grad(loss, list(rnn.parameters()))))
    whole, _ = fused(x)
    assert torch.allclose(results[0][0], whole, atol=1e-12)
    assert torch.allclose(results[1][0], whole, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-10)


def test_encoder_decoder_with_explicit_layers_equals_fused_weights():
    def model(impl):
        torch.manual_seed(0)
        opts = {"impl": impl}
        enc = Encoder(11, 8, "lstm", 6, 2, True, 0.0, opts)
        return Seq2Seq(enc, Bridge("linear", 12, 10, 2, True),
                       Decoder(13, 8, "lstm", 10, 2, 0.0, "general", 12, True, opts)).eval()

    fused, explicit = model("fused"), model("explicit")
    explicit.load_state_dict(fused.state_dict())
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 4, 5, 0, 0], [6, 0, 0, 0, 0]])
    lengths, tgt = torch.tensor([5, 3, 1]), torch.randint(4, 13, (3, 6))
    with torch.no_grad():   # packed encoder, then the input-feeding loop of decoder steps
        assert torch.allclose(fused(src, lengths, tgt), explicit(src, lengths, tgt), atol=1e-5)


def _identity_relu(p: float, layers: int = 1) -> ExplicitRNN:
    """h' = relu(mask * h): the state shows which units the recurrent mask dropped."""
    rnn = ExplicitRNN("rnn_relu", 3, 50, layers, recurrent_dropout=p)
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            param.copy_(torch.eye(50) if name.startswith("weight_hh") else torch.zeros_like(param))
    return rnn


def test_recurrent_dropout_uses_one_mask_per_sequence_and_none_in_eval():
    torch.manual_seed(0)
    rnn = _identity_relu(0.5)
    h0 = torch.ones(1, 4, 50)
    out, _ = rnn(torch.zeros(4, 6, 3), h0)
    dropped = out == 0
    assert torch.equal(dropped[:, 0], dropped[:, -1])          # the same units at every step
    assert 0.25 < dropped[:, 0].float().mean() < 0.75
    assert not torch.equal(dropped[0, 0], dropped[1, 0])        # a mask per sequence
    kept = out[:, -1][~dropped[:, -1]]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 ** 6))  # scaled by 1/(1-p) at each step
    rnn.eval()
    assert torch.equal(rnn(torch.zeros(4, 6, 3), h0)[0], torch.ones(4, 6, 50))
    # a loop of single steps holds its masks fixed too
    rnn.train()
    masks = step_masks(rnn, 4, h0)
    state, seen = h0, []
    for _ in range(5):
        out, state = rnn_step(rnn, torch.zeros(4, 3), state, masks)
        seen.append(out == 0)
    assert all(torch.equal(seen[0], s) for s in seen)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_normalised_cells_learn_a_tiny_task(cell):
    torch.manual_seed(0)
    model = RNNLanguageModel(12, cell, 16, 48, 2, 0.0, False,
                             {"impl": "explicit", "layer_norm": True, "residual": True})
    assert any("ln_hh" in name for name, _ in model.named_parameters())
    loss = overfit_tiny_batch(model, steps=200)
    assert loss < 0.1, f"layer-normalised {cell} did not learn: loss {loss:.3f}"


def test_residual_adds_each_upper_layers_input():
    torch.manual_seed(0)
    plain = ExplicitRNN("gru", 4, 6, 3)
    residual = ExplicitRNN("gru", 4, 6, 3, residual=True)
    residual.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 4)
    assert not torch.allclose(plain(x)[0], residual(x)[0])
    bottom = ExplicitRNN("gru", 4, 6, 1)
    bottom.load_state_dict({k: v for k, v in plain.state_dict().items() if k.endswith("_l0")})
    with torch.no_grad():   # zero upper layers: z = 0.5 and n = 0, so from a zero state they output 0
        for rnn in (plain, residual):
            for name, p in rnn.named_parameters():
                if not name.endswith("_l0"):
                    p.zero_()
        assert torch.equal(plain(x)[0], torch.zeros(2, 5, 6))
        assert torch.allclose(residual(x)[0], bottom(x)[0], atol=1e-6)   # layer 0's output passed up


def _lm(tmp_path, name, overrides=(), resume=False):
    cfg = load_config(write_yaml(tmp_path / f"{name}.yaml", tiny_lm_config(tmp_path, run_dir=str(tmp_path / name))),
                      list(overrides))
    trainer = prepare_trainer(cfg, resume=resume)
    trainer.fit()
    return tmp_path / name


def test_checkpoint_moves_between_implementations(tmp_path):
    run = _lm(tmp_path, "fused", ["train.max_steps=10", "model.num_layers=2"])
    fused = load_task(run / "last.pt", "cpu")
    cfg = load_config(run / "config.yaml", ["model.impl=explicit"])
    from rnnkit.tasks.language_model import build
    from rnnkit.training.checkpoint import load_checkpoint
    explicit = build(cfg, torch.device("cpu"), extras=load_checkpoint(run / "last.pt")["task"], with_data=False)
    explicit.model.load_state_dict(load_checkpoint(run / "last.pt")["model"])
    explicit.model.eval()
    assert isinstance(explicit.model.rnn, ExplicitRNN)
    x = torch.randint(0, len(fused.vocab), (3, 20))
    with torch.no_grad():
        assert torch.allclose(fused.model(x)[0], explicit.model(x)[0], atol=1e-5)
    # a run trained fused continues explicit (and back): only impl may change on resume
    _lm(tmp_path, "fused", ["train.max_steps=14", "model.num_layers=2", "model.impl=explicit"], resume=True)
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 14
    assert isinstance(load_task(run / "last.pt", "cpu").model.rnn, ExplicitRNN)


@pytest.mark.parametrize("key", ["layer_norm=true", "recurrent_dropout=0.2", "residual=true"])
def test_extras_need_the_explicit_implementation(tmp_path, key):
    path = write_yaml(tmp_path / "c.yaml", tiny_lm_config(tmp_path))
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=f"model.{name}: needs model.impl: explicit"):
        load_config(path, [f"model.{key}", "model.num_layers=2"])
    load_config(path, [f"model.{key}", "model.num_layers=2", "model.impl=explicit"])
    with pytest.raises(ConfigError, match="model.residual: connects stacked layers"):
        load_config(path, ["model.residual=true", "model.impl=explicit", "model.num_layers=1"])


def test_translation_with_explicit_layer_norm_and_recurrent_dropout_trains(tmp_path):
    import json

    from rnnkit.tasks.translation import build_model
    from tests.test_translation_task import train as train_translation
    extras = {"impl": "explicit", "layer_norm": True, "recurrent_dropout": 0.2}
    ckpt = train_translation(tmp_path, model={"init_range": 0.1,
                                              "encoder": {"cell": "lstm", "hidden_size": 16, **extras},
                                              "decoder": {"cell": "gru", "hidden_size": 32, **extras}},
                             train={"max_steps": 30, "log_every": 5, "eval_every": 30, "lr": 0.01})
    losses = [json.loads(x)["loss"] for x in (ckpt.parent / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5
    cfg = load_config(ckpt.parent / "config.yaml")
    model = build_model(cfg, 50, 60)
    gains = [p for name, p in model.named_parameters() if ".ln_" in name and "bias" not in name]
    assert gains and all(torch.all(g == 1) for g in gains)   # init_range leaves layer norm alone
    translated = load_task(ckpt, "cpu").translate(["the cat sees the dog", ""], beam=3)
    assert len(translated) == 2 and translated[1].text == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_at_its_rate_and_rescales_what_it_keeps(dtype):
    from rnnkit.models.dropout import Dropout

    torch.manual_seed(0)
    layer = Dropout(0.3)
    x = torch.ones(2000, 1000, dtype=dtype, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.001      # 2,000,000 draws: 3 standard deviations
    assert torch.allclose(y[kept].float(), torch.full_like(y[kept].float(), 1 / 0.7), rtol=1e-2)
    y.float().sum().backward()
    assert torch.equal(x.grad != 0, kept)                   # gradients pass exactly where kept
    assert not torch.equal(layer(x), y)                      # a new mask per call
    layer.eval()
    assert layer(x) is x


def test_a_loaded_model_keeps_nothing_of_its_checkpoint_file(tmp_path):
    """Inference maps the checkpoint (reading only the model's tensors); the model must own
    its weights, so overwriting the file in place afterwards (a run still training) changes nothing."""
    run = _lm(tmp_path, "mapped", ["train.max_steps=4"])
    task = load_task(run / "last.pt", "cpu")
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    size = (run / "last.pt").stat().st_size
    with open(run / "last.pt", "r+b") as f:      # the same inode, every byte changed
        f.write(b"\xff" * size)
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k]), k
