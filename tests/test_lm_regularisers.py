"""The AWD-LSTM toolbox on the language-model task: each regulariser, the adaptive softmax,
NT-ASGD, variable BPTT windows, the continuous cache and backward LMs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rnnkit.config import ConfigError, load_config
from rnnkit.decoding.lm_loop import sample_next
from rnnkit.models.dropout import embedding_dropout, locked_dropout
from rnnkit.models.language_model import RNNLanguageModel
from rnnkit.models.rnn import RegularisedLSTM, make_rnn
from rnnkit.runs import load_task, prepare_trainer
from rnnkit.training.checkpoint import load_checkpoint
from rnnkit.training.optim import Averager
from tests.conftest import tiny_lm_config, write_yaml


def _config(tmp_path, name="run", overrides=(), **sections):
    cfg = tiny_lm_config(tmp_path, run_dir=str(tmp_path / name), **sections)
    return load_config(write_yaml(tmp_path / f"{name}.yaml", cfg), list(overrides))


# --------------------------------------------------------------------------- weight drop
def test_weight_drop_masks_recurrent_weights_in_training_only():
    torch.manual_seed(0)
    layer = make_rnn("lstm", 6, 8, 1, weight_drop=0.5)
    plain = nn.LSTM(6, 8, 1, batch_first=True)
    plain.load_state_dict(layer.state_dict())          # same parameters, same names
    assert isinstance(layer, RegularisedLSTM)
    stored = layer.weight_hh_l0.detach().clone()
    x = torch.randn(3, 5, 6)
    layer.train()
    out, _ = layer(x)
    assert not torch.allclose(out, plain(x)[0])          # a masked recurrence in training
    assert torch.equal(layer.weight_hh_l0, stored)       # the parameter itself is untouched
    out.sum().backward()
    zero = (layer.weight_hh_l0.grad == 0).float().mean().item()
    assert 0.35 < zero < 0.65                            # dropped weights get no gradient
    assert (layer.weight_ih_l0.grad == 0).float().mean().item() < 0.05   # input weights are not dropped
    layer.eval()
    assert torch.equal(layer(x)[0], plain(x)[0])          # off in evaluation


def test_weight_drop_mask_is_shared_by_every_time_step():
    """One mask per forward call: a step's output depends only on the mask and the history, so
    a sequence run in one call equals its steps run with the same mask (same seed)."""
    torch.manual_seed(1)
    layer = make_rnn("gru", 4, 5, 1, weight_drop=0.5).train()
    x = torch.randn(2, 6, 4)
    torch.manual_seed(9)
    whole, _ = layer(x)
    torch.manual_seed(9)
    w_hh = nn.functional.dropout(layer.weight_hh_l0, 0.5, training=True)
    h = torch.zeros(2, 5)
    for t in range(6):
        h = torch.gru_cell(x[:, t], h, layer.weight_ih_l0, w_hh, layer.bias_ih_l0, layer.bias_hh_l0)
        assert torch.allclose(whole[:, t], h, atol=1e-6)


# --------------------------------------------------------------------------- dropouts
def test_embedding_dropout_drops_whole_words_everywhere_they_occur():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4)
    tokens = torch.randint(0, 50, (6, 30))
    plain = emb(tokens)
    out = embedding_dropout(plain, tokens, 50, 0.5, training=True)
    dropped = set()
    for word in tokens.unique().tolist():
        where = tokens == word
        rows, ref = out[where], plain[where]
        if torch.all(rows == 0):
            dropped.add(word)
        else:
            assert torch.allclose(rows, ref * 2.0)        # kept everywhere, scaled by 1 / (1 - p)
    assert 0.2 < len(dropped) / len(tokens.unique()) < 0.8
    assert torch.equal(embedding_dropout(plain, tokens, 50, 0.5, training=False), plain)


def test_locked_dropout_uses_one_mask_per_sequence():
    torch.manual_seed(0)
    x = torch.ones(4, 9, 32)
    out = locked_dropout(x, 0.5, training=True)
    assert torch.equal(out, out[:, :1].expand_as(out))    # the same units at every step
    assert not torch.equal(out[0], out[1])                # each sequence its own mask
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_language_model_locked_dropout_is_constant_over_time():
    """Inputs of the recurrent layer: with locked dropout the zeroed units of each sequence are
    the same at every step; with ordinary dropout they are not."""
    seen = {}
    for locked in (True, False):
        torch.manual_seed(0)
        model = RNNLanguageModel(10, "lstm", 16, 16, 1, 0.5, False, locked_dropout=locked).train()
        captured = []
        model.rnn.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        model(torch.full((2, 12), 3))                     # one word repeated: equal embeddings
        zeros = captured[0] == 0
        seen[locked] = torch.equal(zeros, zeros[:, :1].expand_as(zeros))
    assert seen == {True: True, False: False}


# --------------------------------------------------------------------------- adaptive softmax
def test_adaptive_softmax_is_a_distribution_and_matches_its_loss():
    torch.manual_seed(0)
    model = RNNLanguageModel(300, "lstm", 16, 24, 1, 0.0, False, output="adaptive", cutoffs=[20, 100]).eval()
    tokens = torch.randint(0, 300, (3, 7))
    out, _, _, _ = model.features(tokens)
    logp = model.log_probs(out)
    assert logp.shape == (3, 7, 300)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 7), atol=1e-5)
    targets = torch.randint(0, 300, (3, 7))
    assert torch.allclose(model.target_log_probs(out, targets), logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                          atol=1e-5)
    assert model.loss(out, targets).item() == pytest.approx(-logp.gather(-1, targets.unsqueeze(-1)).mean().item(),
                                                            rel=1e-5)
    # sampling from the adaptive scores is sampling from its distribution
    scores, _ = model(tokens[:1, :3])
    rng = np.random.default_rng(0)
    last = scores[0, -1].detach().numpy()
    draws = np.array([sample_next(last, 1.0, None, None, rng) for _ in range(4000)])
    p = np.exp(last)
    top = int(p.argmax())
    assert (draws == top).mean() == pytest.approx(p[top], abs=0.03)


def test_adaptive_model_trains_generates_and_rejects_bad_cutoffs(tmp_path):
    sections = {"data": {"tokenizer": "word", "bptt": 8},
                "model": {"output": "adaptive", "cutoffs": [10, 40]},
                "train": {"max_steps": 12, "eval_every": 6}}
    cfg = _config(tmp_path, **sections)
    prepare_trainer(cfg).fit()
    task = load_task(tmp_path / "run" / "best.pt")
    words = list(task.generate("the", 20, seed=0))
    assert len(words) == 20 and all(w.strip() in task.vocab.stoi or w == "\n" for w in words)
    with pytest.raises(ConfigError, match="cutoffs"):
        prepare_trainer(_config(tmp_path, "big", **{**sections, "model": {"output": "adaptive",
                                                                          "cutoffs": [10, 100000]}}))
    with pytest.raises(ConfigError, match="weight_drop"):
        _config(tmp_path, "explicit", model={"impl": "explicit", "weight_drop": 0.3})


def test_tied_adaptive_softmax_is_its_own_input_layer():
    torch.manual_seed(0)
    model = RNNLanguageModel(300, "lstm", 16, 16, 1, 0.0, True, output="adaptive", cutoffs=[20, 100])
    assert model.embedding is None
    asm = model.output
    tokens = torch.tensor([[3, 19, 20, 57, 100, 299]])
    vectors = model.embed(tokens)[0]
    assert torch.equal(vectors[0], asm.head.weight[3]) and torch.equal(vectors[1], asm.head.weight[19])
    assert torch.allclose(vectors[3], asm.tail[0][1].weight[57 - 20] @ asm.tail[0][0].weight)
    assert torch.allclose(vectors[5], asm.tail[1][1].weight[299 - 100] @ asm.tail[1][0].weight)
    scores, _ = model(tokens)                     # inputs and outputs share the parameters
    scores[0, :, 0].sum().backward()
    assert asm.tail[1][1].weight.grad[299 - 100].abs().sum() > 0       # reached from the input side only
    assert sum(q.numel() for q in model.parameters()) < 300 * 16 + sum(q.numel() for q in model.rnn.parameters())


# --------------------------------------------------------------------------- AR/TAR, windows
def test_activation_regularisers_add_a_penalty_to_the_gradient_not_the_loss(tmp_path):
    """One SGD step of the Trainer with AR/TAR and one without, from the same weights on the same
    window: their updates differ by exactly lr times the gradient of the penalty's formula, and
    the logged loss is the same."""
    lr, ar, tar = 0.5, 2.0, 1.0
    train = {"optimizer": "sgd", "lr": lr, "clip_grad_norm": None, "max_steps": 1, "log_every": 1}
    runs = {}
    for name, extra in (("plain", {}), ("regularised", {"ar": ar, "tar": tar})):
        trainer = prepare_trainer(_config(tmp_path, name, train={**train, **extra}))
        start = {k: v.clone() for k, v in trainer.task.model.state_dict().items()}
        window = trainer.task.train_batches(0)[0]
        x, _ = trainer.task._window(trainer.task.train_stream, *window)
        trainer.fit()
        logged = next(r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "train")
        runs[name] = (start, x, trainer.task.model.state_dict(), logged["loss"])
    start, x, plain_end, plain_loss = runs["plain"]
    start2, x2, reg_end, reg_loss = runs["regularised"]
    assert all(torch.equal(start[k], start2[k]) for k in start) and torch.equal(x, x2)
    assert reg_loss == pytest.approx(plain_loss, rel=1e-6)          # the penalty is not in the logged loss

    model = RNNLanguageModel(len(load_task(tmp_path / "plain" / "last.pt").vocab), "lstm", 16, 32, 1, 0.0, False)
    model.load_state_dict(start)
    h = model.rnn(model.embed(x))[0]           # the top layer's output from a zero state (dropout 0)
    penalty = ar * h.pow(2).mean() + tar * (h[:, 1:] - h[:, :-1]).pow(2).mean()
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True)))
    moved = 0
    for n in names:
        expected = -lr * (grads[n] if grads[n] is not None else torch.zeros_like(start[n]))
        assert torch.allclose(reg_end[n] - plain_end[n], expected, atol=2e-6), n
        moved += int(grads[n] is not None and grads[n].abs().max() > 1e-4)
    assert moved >= 3          # the recurrent and embedding weights all felt it
    with pytest.raises(ConfigError, match="train.ar"):
        load_config(write_yaml(tmp_path / "c.yaml", {"task": "copy", "train": {"ar": 1.0}}))


def test_variable_bptt_windows_cover_the_stream_and_repeat_per_epoch(tmp_path):
    cfg = _config(tmp_path, data={"bptt": 20, "variable_bptt": True})
    task = prepare_trainer(cfg).task
    width = task.train_stream.shape[1] - 1
    for epoch in (0, 1):
        windows = task.train_batches(epoch)
        assert windows[0][0] == 0 and sum(n for _, n in windows) == width
        assert all(a + n == b for (a, n), (b, _) in zip(windows, windows[1:]))
        assert all(n >= 5 or a + n == width for a, n in windows)
        assert task.train_batches(epoch) == windows                  # a function of seed and epoch
    lengths = {n for _, n in task.train_batches(0)}
    assert len(lengths) > 3
    assert task.train_batches(0) != task.train_batches(1)
    start, length = task.train_batches(0)[0]
    out = task.train_step((start, length), 0, 0)
    assert out.lr_scale == pytest.approx(length / 20) and out.tokens == length * cfg.train.batch_size


def test_trainer_scales_the_learning_rate_by_the_window(tmp_path):
    cfg = _config(tmp_path, data={"bptt": 20, "variable_bptt": True}, train={"optimizer": "sgd", "lr": 0.5})
    trainer = prepare_trainer(cfg)
    seen = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (seen.append(trainer.optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    trainer.fit()
    expected = [0.5 * n / 20 for _, n in trainer.task.train_batches(0)][:len(seen)]
    assert seen == pytest.approx(expected)


# --------------------------------------------------------------------------- NT-ASGD
def _fit_recording_averages(trainer, record=None):
    """``trainer.fit()``; with ``record``, the averaged parameters at every averaging update."""
    if record is None:
        trainer.fit()
        return trainer
    update = Averager.update

    def recording(self):
        update(self)          # the parameters are the same before and after: update only reads them
        record.append([q.detach().clone() for q in self.params])
    Averager.update = recording
    try:
        trainer.fit()
    finally:
        Averager.update = update
    return trainer


def _assert_same_last(tmp_path, a, b, count):
    """Two runs' last.pt: the same averaged and raw weights, after ``count`` averaging updates."""
    a = load_checkpoint(tmp_path / a / "last.pt")
    b = load_checkpoint(tmp_path / b / "last.pt")
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
        assert torch.allclose(a["averaging"]["raw"][key], b["averaging"]["raw"][key], atol=1e-6), key
    assert a["averaging"]["count"] == b["averaging"]["count"] == count


SCRIPT = {2: 5.0, 4: 4.0, 6: 3.0, 8: 3.5, 10: 3.6, 12: 2.0, 14: 2.5, 16: 2.6}   # a plateau, then better


def _nt_asgd(tmp_path, name, max_steps, resume=False, record=None):
    cfg = _config(tmp_path, name, model={"dropout": 0.2},
                  train={"optimizer": "nt_asgd", "lr": 0.5, "nt_asgd_patience": 1, "max_steps": max_steps,
                         "eval_every": 2, "log_every": 1})
    trainer = prepare_trainer(cfg, resume=resume)
    trainer.task.evaluate = lambda: {"loss": SCRIPT[trainer.progress.step]}
    return _fit_recording_averages(trainer, record)


def test_nt_asgd_starts_averaging_on_a_plateau_and_saves_the_average(tmp_path):
    record = []
    trainer = _nt_asgd(tmp_path, "full", 16, record=record)
    # evaluations 5, 4, 3, 3.5, 3.6: 3.6 is worse than the best before the last one (3): step 10
    assert trainer.progress.averaging_from == 10
    assert len(record) == 6                                           # steps 11-16
    best = load_checkpoint(tmp_path / "full" / "best.pt")
    assert best["progress"]["step"] == 12
    names = [n for n, q in trainer.task.model.named_parameters()]
    mean12 = [torch.stack(ps).mean(0) for ps in zip(*record[:2])]     # the mean of steps 11 and 12
    for name, mean in zip(names, mean12):
        assert torch.allclose(best["model"][name], mean, atol=1e-6)
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    for name, raw in zip(names, record[-1]):                          # training goes on from the raw weights
        assert torch.equal(last["averaging"]["raw"][name], raw)
    assert not torch.equal(last["model"][names[0]], record[-1][0])


def test_nt_asgd_resumes_exactly(tmp_path):
    full = _nt_asgd(tmp_path, "full", 16)
    _nt_asgd(tmp_path, "part", 12)                                     # stops while averaging
    part = _nt_asgd(tmp_path, "part", 16, resume=True)
    assert part.progress.averaging_from == full.progress.averaging_from == 10
    _assert_same_last(tmp_path, "full", "part", 6)


def _ema(tmp_path, name, max_steps, resume=False, record=None, **train):
    cfg = _config(tmp_path, name, model={"dropout": 0.2},
                  train={"ema_decay": 0.75, "lr": 0.01, "max_steps": max_steps, "eval_every": 2, "log_every": 1,
                         **train})
    return _fit_recording_averages(prepare_trainer(cfg, resume=resume), record)


def test_ema_evaluates_and_saves_the_moving_average(tmp_path):
    record = []
    trainer = _ema(tmp_path, "full", 8, record=record)
    assert len(record) == 8 and trainer.averager.count == 8
    # the running mean for the first 1/(1 - 0.75) = 4 steps, then 0.75 * the average + 0.25 * the newest
    expected = [torch.stack(ps).mean(0) for ps in zip(*record[:4])]
    for ps in record[4:]:
        expected = [0.75 * e + 0.25 * q for e, q in zip(expected, ps)]
    names = [n for n, q in trainer.task.model.named_parameters()]
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    for name, mean, raw in zip(names, expected, record[-1]):
        assert torch.allclose(last["model"][name], mean, atol=1e-6), name
        assert torch.equal(last["averaging"]["raw"][name], raw)          # training goes on from the raw weights
    assert not torch.equal(last["model"][names[0]], last["averaging"]["raw"][names[0]])
    with pytest.raises(ConfigError, match="train.ema_decay: nt_asgd averages the weights already"):
        _ema(tmp_path, "both", 2, optimizer="nt_asgd")


def test_ema_resumes_exactly(tmp_path):
    _ema(tmp_path, "full", 8)
    _ema(tmp_path, "part", 4)
    _ema(tmp_path, "part", 8, resume=True)
    _assert_same_last(tmp_path, "full", "part", 8)


# --------------------------------------------------------------------------- cache
def _naive_cache(task, ids, size, theta, lam):
    """The cache written as its definition, one position at a time, one stream."""
    model = task.model.eval()
    x = torch.tensor([ids[:-1]])
    out, hidden, _, _ = model.features(x)
    p_model = model.log_probs(out)[0].exp()
    hidden = hidden[0]
    nll_plain, nll_cache = 0.0, 0.0
    for t in range(len(ids) - 1):
        target = ids[t + 1]
        p = p_model[t, target].item()
        nll_plain -= math.log(p)
        lo = max(0, t - size)
        if t > 0:
            w = torch.softmax(theta * hidden[lo:t] @ hidden[t], 0)
            pc = sum(w[i - lo].item() for i in range(lo, t) if ids[i + 1] == target)
            p = (1 - lam) * p + lam * pc
        nll_cache -= math.log(p)
    n = len(ids) - 1
    return nll_plain / n, nll_cache / n


def test_cache_matches_its_definition_and_lowers_perplexity_on_repeated_text(tmp_path):
    cfg = _config(tmp_path, data={"tokenizer": "word", "bptt": 8}, train={"max_steps": 2, "eval_every": 2})
    prepare_trainer(cfg).fit()
    task = load_task(tmp_path / "run" / "best.pt")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # three streams of 329 positions: past the 128-position chunks the cache is computed in, with a
    # history (150) that reaches back across a chunk boundary; each stream has its own cache
    rows = []
    for _ in range(3):
        words = [task.vocab.itos[i] for i in rng.integers(2, len(task.vocab), 10)]
        rows.append(task.encode((" ".join(words) + "\n") * 30))
    plain, cached, n = task.cache_loss(np.asarray(rows), size=150, theta=1.0, lam=0.3)
    naive = [_naive_cache(task, ids, 150, 1.0, 0.3) for ids in rows]
    assert n == 3 * 329 and all(len(r) == 330 for r in rows)
    assert plain == pytest.approx(np.mean([p for p, _ in naive]), rel=1e-4)
    assert cached == pytest.approx(np.mean([c for _, c in naive]), rel=1e-4)
    words = [task.vocab.itos[i] for i in rng.integers(2, len(task.vocab), 15)]
    text = (" ".join(words) + "\n") * 6                                # a text that repeats itself
    one, _, _ = task.cache_loss(np.asarray([task.encode(text)]), size=30, theta=1.0, lam=0.3)
    result = task.evaluate_text(text, rows=1, cache=30, theta=1.0, lam=0.3)
    assert result["cache_ppl"] < 0.7 * result["ppl"]
    assert result["ppl"] == pytest.approx(math.exp(one), rel=1e-5)


# --------------------------------------------------------------------------- backward LM
def test_reverse_reads_every_stream_right_to_left(tmp_path):
    from rnnkit.tasks.language_model import batchify, prepare_data

    cfg = _config(tmp_path, "bwd", data={"tokenizer": "word", "reverse": True})
    bwd = prepare_trainer(cfg).task
    store = prepare_data(cfg)
    train, valid = np.asarray(store.stream("train")), np.asarray(store.stream("valid"))
    assert np.array_equal(bwd.train_stream, batchify(train[::-1], cfg.train.batch_size))
    rows = bwd.valid_stream.size(0)
    assert np.array_equal(bwd.valid_stream.numpy(), batchify(valid[::-1], rows))
    fwd = prepare_trainer(_config(tmp_path, "fwd", data={"tokenizer": "word"})).task
    assert bwd.encode("a b c") == fwd.encode("a b c")[::-1]


def test_regularised_layer_reads_packed_and_padded_batches_alike():
    """Taggers and classifiers (and every layer on GPU) read packed batches: with the same
    masks (same seed), packed and padded runs of a regularised BiLSTM agree on every real step."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from rnnkit.models.rnn import run_padded

    torch.manual_seed(0)
    layer = make_rnn("lstm", 5, 6, 2, dropout=0.4, bidirectional=True, weight_drop=0.5, locked_dropout=True).train()
    x, lengths = torch.randn(4, 7, 5), torch.tensor([7, 3, 5, 2])
    torch.manual_seed(3)
    padded, (h1, c1) = run_padded(layer, x, lengths)          # CPU: the padded kernel path
    torch.manual_seed(3)
    packed, (h2, c2) = layer(pack_packed := pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    assert isinstance(pack_packed, torch.nn.utils.rnn.PackedSequence)
    packed = pad_packed_sequence(packed, batch_first=True, total_length=7)[0]
    assert torch.allclose(padded, packed, atol=1e-5)
    assert torch.allclose(h1, h2, atol=1e-5)
    layer.eval()
    plain = nn.LSTM(5, 6, 2, batch_first=True, bidirectional=True)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x)[0], plain(x)[0])


def test_taggers_and_classifiers_take_the_recurrent_regularisers(tmp_path):
    lines = ["pos\tbright calm water", "neg\tgrey storm water"] * 4
    data = tmp_path / "labels.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {"task": "classification", "run_dir": str(tmp_path / "c"), "data": {"train": str(data), "valid": str(data)},
           "model": {"embedding_dim": 8, "hidden_size": 8, "num_layers": 2, "weight_drop": 0.4,
                     "locked_dropout": True},
           "train": {"max_steps": 2, "eval_every": 2, "batch_size": 4}}
    trainer = prepare_trainer(load_config(write_yaml(tmp_path / "c.yaml", cfg)))
    rnn = trainer.task.model.encoder.rnn
    assert isinstance(rnn, RegularisedLSTM) and rnn.weight_drop == 0.4 and rnn.locked
    trainer.fit()
    with pytest.raises(ConfigError, match="model.weight_drop: applies to fused layers"):
        load_config(write_yaml(tmp_path / "e.yaml", {**cfg, "model": {"impl": "explicit", "weight_drop": 0.4}}))


@pytest.mark.parametrize("carry", [True, False])
def test_carry_state_false_starts_every_training_window_from_zero(tmp_path, carry):
    """With ``data.carry_state: false`` a training window's loss is the model's loss on that
    window from a zero state; carried (the default), it starts where the last window ended."""
    cfg = tiny_lm_config(tmp_path, data={"carry_state": carry}, model={"cell": "mlstm", "cell_heads": 2})
    task = prepare_trainer(load_config(write_yaml(tmp_path / "c.yaml", cfg))).task
    task.model.eval()       # no dropout: the losses compare exactly
    windows = task.train_batches(0)
    with torch.no_grad():
        task.train_step(windows[0], 0, 0)
        second = task.train_step(windows[1], 1, 1).loss
        x, y = task._window(task.train_stream, *windows[1])
        alone = task.model.loss(task.model.features(x).output, y)
    assert torch.allclose(second, alone) is (not carry)
