from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnkit.config import TeacherForcingConfig
from rnnkit.decoding.search import BeamSearch, beam_search, greedy_search
from rnnkit.decoding.torch_steps import TorchSteps
from rnnkit.hardware import autocast
from rnnkit.models.seq2seq import Bridge, Decoder, Encoder, Seq2Seq
from rnnkit.training.teacher_forcing import TeacherForcingSchedule

V_SRC, V_TGT, BOS, EOS = 11, 13, 2, 3


def make_model(attention="general", input_feeding=False, cell="lstm", bridge="linear", bidirectional=True):
    torch.manual_seed(0)
    enc = Encoder(V_SRC, 8, cell, 6, 2, bidirectional, 0.0)
    dec_hidden = enc.output_size if attention == "dot" else 10
    return Seq2Seq(enc, Bridge(bridge, enc.output_size, dec_hidden, 2, cell == "lstm"),
                   Decoder(V_TGT, 8, cell, dec_hidden, 2, 0.0, attention, enc.output_size, input_feeding)).eval()


def padded_batch(pad_fill: int):
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 4, 5, 0, 0], [6, 0, 0, 0, 0]])
    lengths = torch.tensor([5, 3, 1])
    src = src.masked_fill(src == 0, pad_fill)   # what sits in padded positions must not matter
    return src, lengths


@pytest.mark.parametrize("attention", ["none", "dot", "general", "additive"])
@pytest.mark.parametrize("input_feeding", [False, True])
def test_padded_source_positions_change_no_output(attention, input_feeding):
    model = make_model(attention, input_feeding)
    tgt = torch.randint(4, V_TGT, (3, 6))
    with torch.no_grad():
        a = model(*padded_batch(0), tgt)
        b = model(*padded_batch(10), tgt)
    assert torch.allclose(a, b, atol=1e-6)
    state = model.encode(*padded_batch(10))
    _, _, weights = model.decoder.step(tgt[:, 0], state)
    if attention != "none":
        assert torch.all(weights[1, 3:] == 0) and torch.all(weights[2, 1:] == 0)
        assert torch.allclose(weights.sum(-1), torch.ones(3))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_packed_encoding_equals_each_sentence_alone(cell):
    model = make_model(cell=cell)
    src, lengths = padded_batch(0)
    with torch.no_grad():
        out, h, c = model.encoder(src, lengths)
        for i in range(3):
            n = int(lengths[i])
            o1, h1, c1 = model.encoder(src[i:i + 1, :n], lengths[i:i + 1])
            assert torch.allclose(out[i, :n], o1[0], atol=1e-6)
            assert torch.all(out[i, n:] == 0)
            assert torch.allclose(h[i], h1[0], atol=1e-6)
            if c is not None:
                assert torch.allclose(c[i], c1[0], atol=1e-6)


@pytest.mark.parametrize("attention", ["none", "general", "additive"])
def test_parallel_teacher_forced_decoder_equals_the_step_loop(attention):
    model = make_model(attention)
    src, lengths = padded_batch(0)
    tgt = torch.randint(4, V_TGT, (3, 7))
    with torch.no_grad():
        fast = model(src, lengths, tgt)           # one recurrent call over the whole target
        st = model.encode(src, lengths)
        slow = []
        for t in range(tgt.size(1)):
            logits, st, _ = model.decoder.step(tgt[:, t], st)
            slow.append(logits)
    assert torch.allclose(fast, torch.stack(slow, 1), atol=1e-5)


@pytest.mark.parametrize("bridge", ["linear", "zeros", "mean", "max"])
def test_bridges_give_decoder_states(bridge):
    model = make_model(bridge=bridge)
    st = model.encode(*padded_batch(0))
    h, c = st.rnn
    assert h.shape == (2, 3, 10) and c.shape == (2, 3, 10)
    assert (h.abs().sum() == 0) == (bridge == "zeros")


def one_sentence_search(step, state, beam: int, limit: int, bos: int, eos: int):
    """A textbook beam search for one sentence with Python lists (alpha 0): the reference
    that the batched search, which compacts finished hypotheses and sentences, must match."""
    hyps = [([], 0.0, state, False)]
    for t in range(limit):
        cands = []
        for toks, score, st, done in hyps:
            if done:
                cands.append((toks, score, st, True))
                continue
            logits, nxt, _ = step(torch.tensor([toks[-1] if toks else bos]), st)
            if t + 1 >= limit:   # out of length: </s> at no cost
                cands.append((toks + [eos], score, nxt, True))
                continue
            logp = torch.log_softmax(logits[0], -1).tolist()
            cands += [(toks + [v], score + logp[v], nxt, v == eos) for v in range(len(logp))]
        hyps = sorted(cands, key=lambda c: -c[1])[:beam]
        if hyps[0][3]:
            break
    toks, score, _, _ = max((h for h in hyps if h[3]), key=lambda h: h[1])
    return toks[:-1], score


class ChainState:
    """A random 'decoder' whose next-token scores depend on the sentence, the previous token
    and the time step, so that rows mixed up between sentences or hypotheses show."""

    def __init__(self, sentence, prev, t):
        self.sentence, self.prev, self.t = sentence, prev, t

    def select(self, index):
        return ChainState(self.sentence[index], self.prev[index], self.t[index])


def chain_step(table, by_time):
    def step(tokens, st):
        logits = table[st.sentence, tokens] + by_time[st.sentence, st.t]
        return logits, type(st)(st.sentence, tokens, st.t + 1), None
    return step


def random_chain(g, n, state=ChainState, vocab=7, bos=6):
    """``n`` sentences for a random chain decoder: its step, their start state and source lengths."""
    table, by_time = torch.randn(n, vocab, vocab, generator=g) * 2, torch.randn(n, 40, vocab, generator=g)
    lengths = torch.randint(1, 8, (n,), generator=g)
    start = state(torch.arange(n), torch.full((n,), bos), torch.zeros(n, dtype=torch.long))
    return chain_step(table, by_time), start, lengths


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("beam", [1, 2, 4])
def test_batched_search_equals_one_sentence_at_a_time(seed, beam):
    g = torch.Generator().manual_seed(seed)
    n, bos, eos = 6, 6, 1
    step, start, lengths = random_chain(g, n)
    kw = dict(backend=TorchSteps(step, "cpu"), batch_size=n, bos=bos, eos=eos, src_lengths=lengths,
              max_len_ratio=1.5, max_len_extra=2)
    found = [[h] for h in greedy_search(state=start, **kw)] if beam == 1 else beam_search(state=start, beam=beam, **kw)
    for i, (hyp,) in enumerate(found):
        alone = start.select(torch.tensor([i]))
        tokens, score = one_sentence_search(step, alone, beam, int(lengths[i] * 1.5 + 2), bos, eos)
        assert hyp.tokens == tokens
        assert hyp.score == pytest.approx(score, abs=1e-4)


class JoinableChain(ChainState):
    def select(self, index):
        return JoinableChain(self.sentence[index], self.prev[index], self.t[index])

    def join(self, other):
        return JoinableChain(*(torch.cat([a, b]) for a, b in ((self.sentence, other.sentence),
                                                              (self.prev, other.prev), (self.t, other.t))))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beam,n_best", [(1, 1), (3, 1), (4, 2)])
def test_sentences_joining_a_running_search_get_what_they_get_alone(seed, beam, n_best):
    """Continuous batching: sentences join between steps as others leave (slots are reused,
    the history is trimmed); each gets the hypotheses of one batch holding it from the start."""
    g = torch.Generator().manual_seed(seed)
    n, bos, eos = 14, 6, 1
    step, start, lengths = random_chain(g, n, JoinableChain)
    kw = dict(bos=bos, eos=eos, beam=beam, n_best=n_best, max_len_ratio=1.5,
              max_len_extra=2)
    expected = beam_search(TorchSteps(step, "cpu"), start, n, src_lengths=lengths, **kw)
    search = BeamSearch(TorchSteps(step, "cpu"), capacity=4, **kw)
    found, owner, waiting, longest_history = {}, {}, list(range(n)), 0
    while waiting or search.live:
        take = waiting[:min(search.room, int(torch.randint(0, 3, (1,), generator=g)) or 1)]
        if take and search.room:
            del waiting[:len(take)]
            owner.update(zip(search.add(start.select(torch.tensor(take)), lengths[take]), take))
        done = search.step()
        for slot, hyps in zip(done, search.finish(done)):
            found[owner.pop(slot)] = hyps
        longest_history = max(longest_history, len(search._tok))
    assert search.room == 4 and not search._tok                      # every slot free, no history kept
    assert longest_history <= int(lengths.max() * 1.5 + 2) + 1       # trimmed as sentences leave
    for i in range(n):
        assert [h.tokens for h in found[i]] == [h.tokens for h in expected[i]]
        assert [h.score for h in found[i]] == pytest.approx([h.score for h in expected[i]], abs=1e-5)


def test_a_translation_stream_gives_the_batch_decode_translations():
    """Seq2seq states join (sources padded to the longer, then narrowed as the long ones leave):
    a stream with sentences arriving over time decodes each as the batch decode does, attention too."""
    model = make_model("general", input_feeding=True).double()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 9, (10,), generator=g)
    src = torch.randint(4, V_SRC, (10, int(lengths.max())), generator=g)
    kw = dict(bos=BOS, eos=EOS, beam=3, max_len_ratio=2.0, max_len_extra=3)
    with torch.no_grad():
        expected = beam_search(TorchSteps(model.decoder.step, "cpu"), model.encode(src, lengths), 10,
                               src_lengths=lengths, **kw)
        search = BeamSearch(TorchSteps(model.decoder.step, "cpu"), capacity=3, **kw)
        found, owner, nxt = {}, {}, 0
        while nxt < 10 or search.live:
            if search.room and nxt < 10:
                i = nxt
                n = int(lengths[i])
                owner[search.add(model.encode(src[i:i + 1, :n], lengths[i:i + 1]), lengths[i:i + 1])[0]] = i
                nxt += 1
            done = search.step()
            for slot, (hyp,) in zip(done, search.finish(done)):
                found[owner.pop(slot)] = hyp
    for i in range(10):
        n = int(lengths[i])
        assert found[i].tokens == expected[i][0].tokens
        assert found[i].score == pytest.approx(expected[i][0].score, abs=1e-9)
        assert np.allclose(found[i].attention[:, :n], expected[i][0].attention[:, :n], atol=1e-7)
        assert np.all(found[i].attention[:, n:] == 0)


@pytest.mark.parametrize("attention,input_feeding", [("general", True), ("additive", False), ("none", False)])
def test_search_attention_has_a_row_per_emitted_token(attention, input_feeding):
    model = make_model(attention, input_feeding)
    src, lengths = padded_batch(0)
    kw = dict(backend=TorchSteps(model.decoder.step, "cpu"), batch_size=3, bos=BOS, eos=EOS, src_lengths=lengths,
              max_len_ratio=2.0, max_len_extra=3)
    for hyps in [[h] for h in greedy_search(state=model.encode(src, lengths), **kw)] + \
            beam_search(state=model.encode(src, lengths), beam=3, **kw):
        a = hyps[0].attention
        if attention == "none":
            assert a is None
        else:   # the </s> step included; padded source positions get no weight
            assert a.shape == (len(hyps[0].tokens) + 1, src.size(1))
            assert np.allclose(a.sum(-1), 1.0, atol=1e-6)


class MarkovState:
    """A hand-built 'decoder': the next-token distribution depends on the previous token only."""

    def __init__(self, prev: torch.Tensor):
        self.prev = prev

    def select(self, index):
        return MarkovState(self.prev.index_select(0, index))


# tokens: 0 pad, 1 A, 2 B, 3 </s>, 4 <s>
TABLE = torch.tensor([
    [1.0, 0.0, 0.0, 0.0, 0.0],   # after pad (unused)
    [0.0, 0.3, 0.3, 0.4, 0.0],   # after A: nothing likely
    [0.0, 0.05, 0.05, 0.9, 0.0],  # after B: almost surely the end
    [1.0, 0.0, 0.0, 0.0, 0.0],   # after </s>
    [0.0, 0.6, 0.4, 0.0, 0.0],   # first token: A looks better than B
]).clamp(min=1e-9).log()


def markov_step(tokens, state):
    return TABLE[tokens], MarkovState(tokens), None


def test_beam_search_finds_the_known_best_sequence_that_greedy_misses():
    kw = dict(backend=TorchSteps(markov_step, "cpu"), batch_size=2, bos=4, eos=3, src_lengths=torch.tensor([3, 3]),
              max_len_ratio=1.0, max_len_extra=2)
    state = MarkovState(torch.full((2,), 4))
    greedy = greedy_search(state=state, **kw)
    assert greedy[0].tokens == [1]                       # A </s>: 0.6 * 0.4 = 0.24
    nbest = beam_search(state=state, beam=3, n_best=2, **kw)
    for hyps in nbest:
        assert hyps[0].tokens == [2]                     # B </s>: 0.4 * 0.9 = 0.36
        assert hyps[0].score == pytest.approx(math.log(0.36), abs=1e-5)
        assert hyps[1].tokens == [1] and hyps[1].score == pytest.approx(math.log(0.24), abs=1e-5)


def test_beam_search_respects_the_length_limit():
    kw = dict(backend=TorchSteps(markov_step, "cpu"), batch_size=1, bos=4, eos=3, src_lengths=torch.tensor([1]),
              max_len_ratio=1.0, max_len_extra=0)
    (hyps,) = beam_search(state=MarkovState(torch.full((1,), 4)), beam=2, **kw)
    assert hyps[0].tokens == []      # a limit of one step leaves room only for </s>


@pytest.mark.parametrize("schedule,expected", [
    ("constant", {0: 0.9, 500: 0.9, 2000: 0.9}),
    ("linear", {0: 0.9, 500: 0.6, 1000: 0.3, 2000: 0.3}),
    ("exponential", {0: 0.9, 500: 0.3 + 0.6 * 0.1, 1000: 0.3 + 0.6 * 0.01}),
    ("inverse_sigmoid", {0: 0.3 + 0.6 / (1 + math.exp(-5)), 500: 0.6, 1000: 0.3 + 0.6 / (1 + math.exp(5))}),
])
def test_teacher_forcing_schedules_give_their_documented_values(schedule, expected):
    s = TeacherForcingSchedule(TeacherForcingConfig(schedule=schedule, start=0.9, end=0.3, steps=1000))
    for step, value in expected.items():
        assert s(step) == pytest.approx(value, abs=1e-9), (schedule, step)
    values = [s(i) for i in range(0, 3000, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduled_sampling_feeds_own_predictions():
    model = make_model("general", input_feeding=False)
    src, lengths = padded_batch(0)
    tgt = torch.randint(4, V_TGT, (3, 6))
    with torch.no_grad():
        forced = model(src, lengths, tgt, teacher_forcing=1.0)
        own = model(src, lengths, tgt, teacher_forcing=0.0)
    assert torch.allclose(forced[:, 0], own[:, 0], atol=1e-6)   # the first input is <s> either way
    assert not torch.allclose(forced, own)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("layers", [1, 3])
def test_rnn_step_equals_the_fused_layer_on_one_step(cell, layers):
    from rnnkit.models.rnn import make_rnn, rnn_step
    torch.manual_seed(0)
    rnn = make_rnn(cell, 5, 7, layers, dropout=0.5).double().eval()
    x = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    h = torch.randn(layers, 4, 7, dtype=torch.double)
    state = (h, torch.randn_like(h)) if cell == "lstm" else h
    want_out, want_state = rnn(x.unsqueeze(1), state)
    out, got_state = rnn_step(rnn, x, state)
    assert torch.allclose(out, want_out[:, 0])
    for a, b in zip(got_state if cell == "lstm" else [got_state], want_state if cell == "lstm" else [want_state]):
        assert torch.allclose(a, b)
    (grad_a,) = torch.autograd.grad(out.sum(), x)
    (grad_b,) = torch.autograd.grad(want_out.sum(), x)
    assert torch.allclose(grad_a, grad_b)


@pytest.mark.parametrize("layers", [1, 2])
def test_input_feeding_loop_with_one_product_per_weight_equals_the_step_by_step_loop(layers, monkeypatch):
    """LSTMSteps (known inputs' product for all steps, one recurrent product per step, each
    weight's gradient in one product in backward) against rnn_step, in float64."""
    from rnnkit.models import rnn as rnn_module

    torch.manual_seed(0)
    enc = Encoder(50, 16, "lstm", 12, 1, True, 0.0)
    dec = Decoder(60, 16, "lstm", 20, layers, 0.0, "general", 24, True)
    model = Seq2Seq(enc, Bridge("linear", 24, 20, layers, True), dec).double()
    src, lengths = torch.randint(1, 50, (5, 7)), torch.tensor([7, 3, 5, 1, 6])
    tgt = torch.randint(1, 60, (5, 6))
    results = []
    for fast in (True, False):
        monkeypatch.setattr(rnn_module.LSTMSteps, "applies", staticmethod(lambda rnn, f=fast: f))
        model.zero_grad()
        feats = model.features(src, lengths, tgt)
        (feats * torch.linspace(-1, 1, feats.numel(), dtype=feats.dtype).view_as(feats)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((feats.detach(), grads))
    assert len(results[0][1]) == len(results[1][1]) == len(list(model.parameters())) - 2   # all but the output layer
    assert torch.allclose(results[0][0], results[1][0], atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-12)


def test_input_feeding_loop_under_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = make_model(input_feeding=True)
    src, lengths = torch.randint(1, V_SRC, (4, 6)), torch.tensor([6, 2, 4, 5])
    tgt = torch.randint(1, V_TGT, (4, 5))
    exact = model.features(src, lengths, tgt)
    exact.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    with autocast("cpu", torch.bfloat16):
        low = model.features(src, lengths, tgt)
    low.float().sum().backward()
    assert (exact - low.float()).abs().max() < 0.03
    for a, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        assert p.grad.dtype == torch.float32 and (a - p.grad).abs().max() < 0.05 * a.abs().max() + 1e-3


def test_search_steps_with_the_vocabulary_prepared_equal_plain_steps(monkeypatch):
    """Decoder.step in search (input feeding into a fused LSTM): the vocabulary's embedding
    products are prepared once; logits, states and beams equal rnn_step's, and the prepared
    products follow weight updates."""
    from rnnkit.models.seq2seq import Decoder as Dec

    model = make_model(input_feeding=True).double()
    src, lengths = torch.randint(4, V_SRC, (3, 5)), torch.tensor([5, 2, 4])
    tokens = torch.tensor([BOS, BOS, BOS])

    def two_steps():
        with torch.no_grad():
            st = model.encode(src, lengths)
            logits, st, _ = model.decoder.step(tokens, st)
            logits2, st, _ = model.decoder.step(logits.argmax(-1), st)
            beams = beam_search(TorchSteps(model.decoder.step, "cpu"), model.encode(src, lengths), 3, BOS, EOS, lengths,
                                beam=3)
        return [logits, logits2, *st.rnn], [h.tokens for hs in beams for h in hs]

    fast, fast_beams = two_steps()
    assert model.decoder._steps_cache is not None                 # the prepared path ran
    monkeypatch.setattr(Dec, "_token_steps", lambda self: None)
    plain, plain_beams = two_steps()
    for a, b in zip(fast, plain):
        assert torch.allclose(a, b, atol=1e-12)
    assert fast_beams == plain_beams
    monkeypatch.undo()
    with torch.no_grad():
        model.decoder.rnn.weight_hh_l0.mul_(1.5)                  # as an optimizer step would
        model.decoder.embedding.weight.add_(0.1)
    changed, _ = two_steps()
    monkeypatch.setattr(Dec, "_token_steps", lambda self: None)
    expected, _ = two_steps()
    assert not torch.allclose(changed[0], fast[0])
    for a, b in zip(changed, expected):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("width", [10004, 1280, 700, 9])
def test_blockwise_top_k_equals_torch_topk(width):
    from rnnkit.decoding.torch_steps import top_k

    torch.manual_seed(width)
    x = torch.randn(37, width)
    x[3, -1] = 50.0                                   # a winner in the tail after the last block
    x[4, :] = 1.0                                     # all equal
    x[5, ::7] = 9.0                                   # ties spread over blocks
    x[6, 200:260] = float("-inf")
    for k in (1, 5, 8):
        values, index = top_k(x, k)
        expected = x.topk(k, dim=-1)
        assert torch.equal(values, expected.values)
        assert torch.equal(x.gather(1, index), values)                   # the indices point at them
        assert all(len(set(row.tolist())) == k for row in index)         # k distinct columns
        distinct = [r for r in range(x.size(0)) if r not in (4, 5)]
        assert torch.equal(index[distinct], expected.indices[distinct])


@pytest.mark.parametrize("input_feeding", [False, True])
def test_sources_padded_to_a_length_multiple_change_no_loss_or_gradient(input_feeding):
    """Training batches round the source width up (rnnkit.hardware.LENGTH_MULTIPLE) so that
    the encoder sees few shapes; the extra positions are padding, masked everywhere."""
    import torch.nn.functional as F

    from rnnkit.data.parallel import IGNORE, make_batch

    model = make_model("general", input_feeding).double().train()
    g = torch.Generator().manual_seed(3)
    src = [torch.randint(4, V_SRC, (n,), generator=g).tolist() for n in (5, 3, 1, 6)]
    tgt = [torch.randint(4, V_TGT, (n,), generator=g).tolist() for n in (4, 6, 2, 3)]
    results = []
    for multiple in (1, 8):
        b = make_batch(src, tgt, range(4), BOS, EOS, src_multiple=multiple)
        assert b.src.size(1) == (6 if multiple == 1 else 8)
        model.zero_grad()
        feats = model.features(b.src, b.src_lengths, b.tgt_in).reshape(-1, 10).index_select(0, b.positions)
        loss = F.cross_entropy(model.decoder.project(feats), b.gold, ignore_index=IGNORE)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b_, grads_b) = results
    assert torch.allclose(a, b_, atol=1e-12)
    assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(grads_a, grads_b))
