"""Tests that each guard one piece of arithmetic which, broken on purpose, left every other
test passing: the scaled dot product of multi-head attention, the attention-hops penalty,
the beam search's length penalty."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnkit.decoding.search import beam_search, length_penalty


def test_multi_head_dot_attention_scales_each_heads_scores_by_one_over_root_d():
    from rnnkit.models.attention import MultiHeadAttention

    torch.manual_seed(0)
    att = MultiHeadAttention("dot", 8, 6, heads=2)
    query, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    context, weights = att(query, att.keys(memory), memory, mask)
    q = att.query_proj(query).view(2, 3, 2, 4)
    k = att.key_proj(memory).view(2, 5, 2, 4)
    scores = torch.einsum("bthd,bshd->bths", q, k) / math.sqrt(4)           # d = 8 / 2 heads
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    assert torch.allclose(weights, torch.softmax(scores, -1), atol=1e-6)
    v = att.value_proj(memory).view(2, 5, 2, 3)
    want = att.out_proj(torch.einsum("bths,bshm->bthm", torch.softmax(scores, -1), v).reshape(2, 3, 6))
    assert torch.allclose(context, want, atol=1e-6)


def test_the_classifier_loss_adds_the_hops_penalty_in_training():
    from types import SimpleNamespace

    from rnnkit.models.labeling import hop_penalty
    from rnnkit.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    weights = torch.softmax(torch.randn(4, 3, 7), -1)
    logits = torch.randn(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    gram = weights @ weights.transpose(1, 2)
    assert hop_penalty(weights) == pytest.approx(float(((gram - torch.eye(3)) ** 2).sum((1, 2)).mean()), rel=1e-6)
    task = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(word_dropout=0.0),
                                               train=SimpleNamespace(attention_penalty=0.3)),
                           forward=lambda batch, words: (logits, weights))
    batch = {"words": torch.zeros(4, 7, dtype=torch.long), "labels": labels}
    ce = torch.nn.functional.cross_entropy(logits, labels)
    trained = ClassificationTask.loss(task, batch, training=True)
    assert float(trained) == pytest.approx(float(ce + 0.3 * hop_penalty(weights)), rel=1e-6)
    assert float(ClassificationTask.loss(task, batch, training=False)) == pytest.approx(float(ce), rel=1e-6)
    assert float(trained) > float(ce) + 0.01


class _Table:
    """A decoder whose next-token log-probabilities depend only on the last token:
    ``table[last]`` over the vocabulary (0 <s>, 1 </s>, 2 a, 3 b)."""

    def __init__(self, table: dict[int, list[float]]):
        self.table = {k: np.log(np.asarray(v)) for k, v in table.items()}

    def step(self, tokens, state, k):
        scores = np.stack([self.table[int(t)] for t in tokens])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), top, None, state

    def select(self, state, index):
        return state[index]

    def join(self, a, b):
        return np.concatenate([a, b])

    def narrow_source(self, state, width):
        return state


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0])
def test_beam_search_ranks_by_the_gnmt_length_penalty(alpha):
    """From <s>: </s> at once (p 0.40) or "a" (0.55); after "a": </s> (0.70). Raw
    log-probability prefers the empty sentence; a length penalty with alpha >= 0.6 prefers
    "a </s>"; each hypothesis's score is its log-probability over ((5 + |Y|) / 6) ** alpha."""
    backend = _Table({0: [1e-9, 0.40, 0.55, 0.05 - 1e-9], 2: [1e-9, 0.70, 0.25, 0.05 - 1e-9],
                      3: [1e-9, 0.70, 0.25, 0.05 - 1e-9]})
    [hyps] = beam_search(backend, np.zeros((1, 1)), 1, 0, 1, np.asarray([3]), beam=3, n_best=2, alpha=alpha)
    raw = {(): math.log(0.40), (2,): math.log(0.55) + math.log(0.70)}
    for h in hyps:
        if tuple(h.tokens) in raw:
            lp = ((5 + len(h.tokens) + 1) / 6) ** alpha           # |Y| counts </s>
            assert h.score == pytest.approx(raw[tuple(h.tokens)] / lp, rel=1e-9)
    assert hyps[0].tokens == ([] if alpha == 0.0 else [2])
    assert length_penalty(np.asarray([1, 3]), 0.0).tolist() == [1.0, 1.0]
    assert length_penalty(np.asarray([7]), 2.0)[0] == pytest.approx(4.0)
