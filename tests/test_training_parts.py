from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnkit.config import TrainConfig
from rnnkit.decoding.lm_loop import filter_log_probs, sample_next
from rnnkit.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rnnkit.training.schedules import LRSchedule


def minimal_payload(**extra):
    return {"config": {"task": "lm"}, "model": {}, "task": {}, **extra}


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(minimal_payload(step=1, w=torch.ones(3)), path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"cannot write .*last\.pt: No space left on device; "
                                              r"the previous last\.pt is unchanged"):
        save_checkpoint(minimal_payload(step=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temporary files left


def test_checkpoint_versions_and_unknown_tasks_are_named(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"format": "rnnkit-checkpoint-7", "rnnkit_version": "9.0", **minimal_payload()}, path)
    with pytest.raises(CheckpointError, match=r"format version '7', written by rnnkit 9.0; this rnnkit "
                                              r"\(0.1.0\) reads version 1"):
        load_checkpoint(path)
    save_checkpoint({**minimal_payload(), "config": {"task": "speech"}}, path)
    with pytest.raises(CheckpointError, match="a checkpoint of task 'speech', which this rnnkit"):
        load_checkpoint(path)


def test_checkpoint_refuses_code_and_foreign_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "rnnkit-checkpoint-1", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a readable rnnkit checkpoint") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert "without running code" in str(refused.value) and "Weights only" not in str(refused.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an rnnkit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_lr_schedules():
    def lrs(**kw):
        s = LRSchedule(TrainConfig(lr=1.0, max_steps=100, **kw))
        return [s.lr(i) for i in range(100)]

    assert set(lrs()) == {1.0}
    warm = lrs(warmup_steps=4)
    assert warm[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    step = lrs(lr_schedule="step", lr_step_size=10, lr_gamma=0.5)
    assert step[9] == 1.0 and step[10] == 0.5 and step[25] == 0.25
    cos = lrs(lr_schedule="cosine", min_lr=0.1)
    assert cos[0] == 1.0 and cos[50] == pytest.approx(0.55) and cos[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    tri = lrs(lr_schedule="slanted_triangular", warmup_steps=10)
    assert tri[9] == 1.0 and tri[-1] == pytest.approx(1 / 32, abs=0.011)


def test_budget_decay_ends_at_the_time_limit():
    """Under decay_by: budget the decay ends at max_time when that comes before max_steps;
    by steps it ignores the clock."""
    kw = dict(lr=1.0, min_lr=0.0, max_steps=1000, max_time=100.0, warmup_steps=10)
    by_steps = LRSchedule(TrainConfig(lr_schedule="cosine", **kw))
    budget = LRSchedule(TrainConfig(lr_schedule="cosine", decay_by="budget", **kw))
    assert by_steps.lr(200, elapsed=99.0) == by_steps.lr(200) > 0.9
    assert budget.lr(200, elapsed=50.0) == pytest.approx(0.5)          # half the time: half of cosine
    assert budget.lr(200, elapsed=100.0) == pytest.approx(0.0, abs=1e-12)
    assert budget.lr(990, elapsed=1.0) == by_steps.lr(990)            # steps further along: steps rule
    tri = LRSchedule(TrainConfig(lr_schedule="slanted_triangular", decay_by="budget", **kw))
    assert tri.lr(50, elapsed=100.0) == pytest.approx(1 / 32) and tri.lr(5, elapsed=100.0) < 1.0


def test_plateau_decays_after_patience_and_resumes():
    s = LRSchedule(TrainConfig(lr=1.0, lr_schedule="plateau", lr_patience=1, lr_gamma=0.1))
    for v in [3.0, 2.0, 2.5]:
        s.observe(v, "min")
    assert s.lr(0) == 1.0
    s.observe(2.2, "min")      # second evaluation without improvement: decay
    assert s.lr(0) == pytest.approx(0.1)
    t = LRSchedule(TrainConfig(lr=1.0, lr_schedule="plateau"))
    t.load_state_dict(s.state_dict())
    assert t.lr(5) == pytest.approx(0.1)


def test_top_k_and_top_p_filtering():
    log_probs = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isinf(filter_log_probs(log_probs, top_k=2)[2:]).all()
    kept = filter_log_probs(log_probs, top_p=0.7)
    assert np.isfinite(kept[:2]).all() and np.isinf(kept[2:]).all()
    kept = filter_log_probs(log_probs, top_p=0.5)
    assert np.isfinite(kept[0]) and np.isinf(kept[1:]).all()
    rng = np.random.default_rng(0)
    draws = [sample_next(log_probs, 1.0, 2, None, rng) for _ in range(200)]
    assert set(draws) == {0, 1}
    cold = [sample_next(log_probs, 0.01, None, None, rng) for _ in range(50)]
    assert set(cold) == {0}
    with pytest.raises(ValueError):
        sample_next(log_probs, 0.0, None, None, rng)


def test_low_temperature_sharpens():
    log_probs = np.array([2.0, 1.0, 0.0])
    rng = np.random.default_rng(1)
    hot = sum(sample_next(log_probs, 5.0, None, None, rng) != 0 for _ in range(400))
    cold = sum(sample_next(log_probs, 0.3, None, None, rng) != 0 for _ in range(400))
    assert cold < hot and math.isfinite(hot)


def test_length_batches_cover_every_sentence_once_within_budget():
    from rnnkit.data.parallel import length_batches
    lengths = [((i * 37) % 23) + 1 for i in range(500)]
    by_sentences = length_batches(lengths, 16, None, torch.Generator().manual_seed(0))
    assert sorted(i for b in by_sentences for i in b) == list(range(500))
    assert all(len(b) <= 16 for b in by_sentences)
    again = length_batches(lengths, 16, None, torch.Generator().manual_seed(0))
    assert again == by_sentences                                  # reproducible for a seed
    assert length_batches(lengths, 16, None, torch.Generator().manual_seed(1)) != by_sentences
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in by_sentences) / len(by_sentences)
    assert spread <= 2                                            # similar lengths batched together
    by_tokens = length_batches(lengths, 10_000, 120, torch.Generator().manual_seed(0))
    assert sorted(i for b in by_tokens for i in b) == list(range(500))
    assert all(max(lengths[i] for i in b) * len(b) <= 120 for b in by_tokens)


def test_pad_and_batch_shapes():
    from rnnkit.data.parallel import make_batch
    b = make_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [0, 1], bos=2, eos=3)
    assert b.src.tolist() == [[5, 6, 7], [8, 0, 0]] and b.src_lengths.tolist() == [3, 1]
    assert b.tgt_in.tolist() == [[2, 9, 10, 0], [2, 11, 12, 13]]
    assert b.tgt_out.tolist() == [[9, 10, 3, 0], [11, 12, 13, 3]]
    # the real targets' positions, then copies of the first up to a multiple of 16, ignored by the loss
    assert b.tokens == 7 and b.positions.tolist() == [0, 1, 2, 4, 5, 6, 7] + [0] * 9
    assert b.gold.tolist() == [9, 10, 3, 11, 12, 13, 3] + [-100] * 9


def test_rows_added_for_the_output_layer_change_neither_loss_nor_gradients():
    """Rounding the output layer's rows up (for oneDNN's kernel reuse) is invisible to training."""
    import torch.nn.functional as F

    from rnnkit.data.parallel import make_batch
    torch.manual_seed(0)
    b = make_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [0, 1], bos=2, eos=3)
    feats = torch.randn(b.tgt_out.numel(), 8, requires_grad=True)
    out = torch.nn.Linear(8, 20)
    real = b.positions[:b.tokens]
    exact = F.cross_entropy(out(feats[real]), b.tgt_out.view(-1)[real])
    exact_grads = torch.autograd.grad(exact, [feats, out.weight])
    rounded = F.cross_entropy(out(feats.index_select(0, b.positions)), b.gold, ignore_index=-100)
    grads = torch.autograd.grad(rounded, [feats, out.weight])
    assert torch.allclose(exact, rounded)
    assert all(torch.allclose(a, g, atol=1e-7) for a, g in zip(exact_grads, grads))


@pytest.mark.parametrize("limit", [None, 1e-3, 1e6])
def test_gradient_clipping_rescales_only_norms_over_the_limit(tmp_path, limit):
    from rnnkit.config import load_config
    from rnnkit.runs import prepare_trainer
    from tests.conftest import tiny_lm_config, write_yaml

    raw = tiny_lm_config(tmp_path, train={"optimizer": "sgd", "lr": 1.0, "clip_grad_norm": limit})
    trainer = prepare_trainer(load_config(write_yaml(tmp_path / "c.yaml", raw)))
    params = [q for q in trainer.task.model.parameters() if q.requires_grad]
    before = [q.detach().clone() for q in params]
    batch = trainer.task.train_batches(0)[0]
    _, norm, _ = trainer._step(batch, params)
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q.detach() - b)
                                                  for q, b in zip(params, before)]))
    assert 0.01 < float(norm) < 1e6                           # the gradient's norm before clipping
    expected = min(float(norm), limit) if limit else float(norm)   # plain SGD, lr 1: the step is the gradient
    assert moved.item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("chunk", [3, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_linear_cross_entropy_equals_the_plain_layer_and_loss(chunk, bias):
    """The output layer's loss a chunk of rows at a time (gradients computed in the forward
    pass): the value and every gradient of F.cross_entropy(F.linear(...)), ignored rows left out."""
    import torch.nn.functional as F

    from rnnkit.models.losses import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    layer = torch.nn.Linear(6, 17, bias=bias).double()
    y = torch.randint(0, 17, (10,), generator=g)
    y[[2, 7]] = -100
    results = []
    for fn in (lambda: F.cross_entropy(layer(x) * 1.0, y, ignore_index=-100),
               lambda: linear_cross_entropy(x, layer.weight, layer.bias, y, -100, chunk=chunk) * 1.0):
        x.grad = None
        layer.zero_grad()
        loss = fn()
        (loss * 3.0).backward()                      # an upstream factor reaches every gradient
        results.append([loss.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
        with torch.no_grad():                        # the forward-only path (evaluation)
            results[-1].append(fn())
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12)


def test_chunked_linear_cross_entropy_under_bf16_autocast_stays_close():
    """Under CPU autocast the chunked loss runs its products in bf16 and its softmax in fp32,
    as the plain layer and loss do: the same loss and gradients up to bf16 rounding, in fp32."""
    import torch.nn.functional as F

    from rnnkit.models.losses import linear_cross_entropy

    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    layer = torch.nn.Linear(16, 50)
    y = torch.randint(0, 50, (40,))
    found = []
    for fn in (lambda: F.cross_entropy(layer(x), y), lambda: linear_cross_entropy(x, layer.weight, layer.bias, y)):
        x.grad = None
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        found.append((loss.detach(), x.grad.clone(), layer.weight.grad.clone()))
    (a, xa, wa), (b, xb, wb) = found
    assert b.dtype == torch.float32 and xb.dtype == torch.float32 and wb.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-3)
    assert (xa - xb).norm() / xa.norm() < 0.02 and (wa - wb).norm() / wa.norm() < 0.02
