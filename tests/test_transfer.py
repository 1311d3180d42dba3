"""Starting taggers, classifiers and LMs from pretrained language models (model.init_from)."""
from __future__ import annotations

import pytest
import torch

from rnnkit.config import ConfigError, load_config
from rnnkit.runs import load_task, prepare_trainer
from rnnkit.transfer import language_model
from tests.conftest import SAMPLE_TEXT, tiny_lm_config, write_yaml

SIZES = {"cell": "lstm", "embedding_dim": 16, "hidden_size": 16, "num_layers": 2}


def _lm(tmp_path, name, tokenizer="word", reverse=False, **model):
    cfg = tiny_lm_config(tmp_path, run_dir=str(tmp_path / name),
                         data={"tokenizer": tokenizer, "reverse": reverse, "bptt": 8},
                         model={**SIZES, **model}, train={"max_steps": 4, "eval_every": 4})
    prepare_trainer(load_config(write_yaml(tmp_path / f"{name}.yaml", cfg))).fit()
    return tmp_path / name / "best.pt"


def _labelled(tmp_path):
    """A tiny sentiment set whose words partly occur in the LM's text."""
    lines = ["pos\tthe harbour was bright and calm", "neg\tthe zyxqv storm broke the boats",
             "pos\ta calm morning in the harbour", "neg\tcold wind and grey water"] * 4
    path = tmp_path / "labelled.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _classifier(tmp_path, name, **model):
    data = _labelled(tmp_path)
    cfg = {"task": "classification", "run_dir": str(tmp_path / name), "seed": 3,
           "data": {"train": str(data), "valid": str(data)},
           "model": {**SIZES, "num_layers": 2, **model},
           "train": {"max_steps": 2, "eval_every": 2, "batch_size": 4}}
    return prepare_trainer(load_config(write_yaml(tmp_path / f"{name}.yaml", cfg)))


def test_init_from_copies_known_words_and_recurrent_layers(tmp_path):
    fwd, bwd = _lm(tmp_path, "fwd"), _lm(tmp_path, "bwd", reverse=True)
    lm_f, lm_b = load_task(fwd), load_task(bwd)
    fresh = _classifier(tmp_path, "fresh").task
    task = _classifier(tmp_path, "init", init_from=str(fwd), init_from_backward=str(bwd)).task
    emb, words = task.model.embedding.weight, task.words.itos
    shared = [w for w in words if w in lm_f.vocab.stoi and not w.startswith("<")]
    new = [w for w in words if w not in lm_f.vocab.stoi and w.lower() not in lm_f.vocab.stoi]
    assert "harbour" in shared and "zyxqv" in new
    for w in shared:
        assert torch.equal(emb[task.words.stoi[w]], lm_f.model.embedding.weight[lm_f.vocab.stoi[w]])
    for w in new:     # fresh vectors: as the same seed gives without init_from
        assert torch.equal(emb[task.words.stoi[w]], fresh.model.embedding.weight[fresh.words.stoi[w]])
    rnn = task.model.encoder.rnn
    for name in ("weight_hh_l0", "bias_ih_l1", "weight_ih_l0"):
        assert torch.equal(getattr(rnn, name), getattr(lm_f.model.rnn, name))
        assert torch.equal(getattr(rnn, name + "_reverse"), getattr(lm_b.model.rnn, name))
    # a bidirectional layer's input holds both directions: each LM's columns where its direction's lie
    assert torch.equal(rnn.weight_ih_l1[:, :16], lm_f.model.rnn.weight_ih_l1)
    assert torch.equal(rnn.weight_ih_l1_reverse[:, 16:], lm_b.model.rnn.weight_ih_l1)
    # and the other direction's columns start at zero: layer 2 computes what the LM's layer 2 did
    assert not rnn.weight_ih_l1[:, 16:].any() and not rnn.weight_ih_l1_reverse[:, :16].any()


def test_init_from_tied_adaptive_lm_uses_its_input_vectors(tmp_path):
    lm_path = _lm(tmp_path, "tied", output="adaptive", tie_weights=True, cutoffs=[10, 30])
    lm = load_task(lm_path)
    task = _classifier(tmp_path, "init", init_from=str(lm_path)).task
    i, j = task.words.stoi["harbour"], lm.vocab.stoi["harbour"]
    assert torch.allclose(task.model.embedding.weight[i], lm.model.embed(torch.tensor([j]))[0])


def test_init_from_a_model_of_the_wrong_kind_is_one_clear_error(tmp_path):
    char = _lm(tmp_path, "char", tokenizer="char")
    with pytest.raises(ConfigError, match=r"model.init_from: .*char-level LM; word vectors need a word-level"):
        _classifier(tmp_path, "a", init_from=str(char))
    wide = _lm(tmp_path, "wide", hidden_size=24)
    with pytest.raises(ConfigError, match=r"hidden_size 24, this model model.hidden_size 16"):
        _classifier(tmp_path, "b", init_from=str(wide))
    fwd = _lm(tmp_path, "fwd")
    with pytest.raises(ConfigError, match="is a forward LM .* needs a backward one"):
        _classifier(tmp_path, "c", init_from_backward=str(fwd))
    with pytest.raises(ConfigError, match="file not found"):
        _classifier(tmp_path, "d", init_from=str(tmp_path / "missing.pt"))


def test_lm_fine_tuning_starts_from_every_weight_and_the_vocabulary(tmp_path):
    base = _lm(tmp_path, "base")
    other = tmp_path / "other.txt"
    other.write_text("the harbour at night\nboats and lights\n" * 50, encoding="utf-8")
    cfg = tiny_lm_config(tmp_path, run_dir=str(tmp_path / "tuned"),
                         data={"tokenizer": "word", "bptt": 8, "path": str(other)},
                         model={**SIZES, "init_from": str(base)}, train={"max_steps": 1, "eval_every": 1})
    trainer = prepare_trainer(load_config(write_yaml(tmp_path / "tuned.yaml", cfg)))
    original = load_task(base)
    assert trainer.task.vocab.itos == original.vocab.itos
    for key, value in original.model.state_dict().items():
        assert torch.equal(trainer.task.model.state_dict()[key], value)
    cfg["model"] = {**SIZES, "hidden_size": 24, "init_from": str(base)}
    cfg["run_dir"] = str(tmp_path / "bad")
    with pytest.raises(ConfigError, match="model.init_from: .*does not fit"):
        prepare_trainer(load_config(write_yaml(tmp_path / "bad.yaml", cfg)))


# --------------------------------------------------------------------------- LM features (Flair)
def test_lm_features_are_frozen_and_depend_only_on_the_sentence(tmp_path):
    fwd, bwd = _lm(tmp_path, "fwd"), _lm(tmp_path, "bwd", reverse=True)
    char = _lm(tmp_path, "char", tokenizer="char", reverse=True)
    trainer = _classifier(tmp_path, "feat", lm_features=[str(fwd), str(bwd), str(char)])
    task = trainer.task
    lm = task.model.lm
    assert lm.output_size == 48 and not any(q.requires_grad for q in lm.parameters())
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())     # no update reached them
    assert task.model.training and not any(m.training for m in lm.lms)            # and never dropout
    sentence = "the harbour was calm".split()
    alone = lm(lm.collate([lm.encode(sentence)], task.device), 4)
    longer = "a calm morning in the harbour and the boats".split()
    both = lm(lm.collate([lm.encode(longer), lm.encode(sentence)], task.device), len(longer))
    assert torch.allclose(both[1, :4], alone[0], atol=1e-6)                       # padding changes nothing
    other = lm(lm.collate([lm.encode("cold wind was calm".split())], task.device), 4)
    assert not torch.allclose(other[0, 3], alone[0, 3])                           # the context does


def test_projected_lm_features_train_the_projection_only_and_reload(tmp_path):
    fwd, char = _lm(tmp_path, "fwd"), _lm(tmp_path, "char", tokenizer="char", reverse=True)
    trainer = _classifier(tmp_path, "proj", lm_features=[str(fwd), str(char)], lm_features_size=8)
    task = trainer.task
    lm = task.model.lm
    assert lm.output_size == 8 and task.model.encoder.rnn.input_size == 16 + 8
    assert [q.requires_grad for q in lm.parameters()].count(True) == 2            # the projection's weight, bias
    assert all(any(q is p for p in task.model.layer_groups()[0]) for q in lm.projection.parameters())
    frozen = {k: v.clone() for k, v in lm.lms.state_dict().items()}
    start = lm.projection.weight.detach().clone()
    batch = lm.collate([lm.encode("the harbour was calm".split())], task.device)
    assert torch.allclose(lm(batch, 4), lm.projection(lm.states(batch, 4)))
    trainer.fit()
    assert all(torch.equal(frozen[k], v) for k, v in lm.lms.state_dict().items())
    assert not torch.equal(lm.projection.weight, start)                           # it was trained
    loaded = load_task(tmp_path / "proj" / "last.pt").model.lm
    assert torch.equal(loaded.projection.weight, lm.projection.weight)
    assert torch.allclose(loaded(loaded.collate([loaded.encode("the harbour was calm".split())], task.device), 4),
                          lm(batch, 4), atol=1e-6)
    with pytest.raises(ConfigError, match="model.lm_features_size: there are no model.lm_features"):
        _classifier(tmp_path, "none", lm_features_size=8)


def test_cached_lm_features_equal_computed_ones_and_stay_bounded(tmp_path):
    fwd, char = _lm(tmp_path, "fwd"), _lm(tmp_path, "char", tokenizer="char", reverse=True)
    trainer = _classifier(tmp_path, "feat", lm_features=[str(fwd), str(char)], lm_features_cache_mb=0)
    lm, device = trainer.task.model.lm, trainer.task.device
    sentences = ["the harbour was calm".split(), "a calm morning in the harbour and the boats".split(),
                 "cold wind".split(), "the harbour was calm".split()]
    batch = lm.collate([lm.encode(s) for s in sentences], device)
    plain = lm(batch, 9)
    assert not plain[2, 2:].any() and plain[2, :2].abs().sum(-1).min() > 0     # padding is zeros
    lm.use_cache(1.0)
    first = lm(batch, 9)                      # every sentence computed (one twice in the batch), then kept
    assert (lm.misses, lm.hits) == (4, 0) and len(lm._cache) == 3
    assert torch.allclose(first, plain, atol=1e-6)
    again = lm(lm.collate([lm.encode(s) for s in sentences[2:0:-1]], device), 9)
    assert lm.hits == 2 and torch.equal(again[0, :2], first[2, :2]) and torch.equal(again[1], first[1])
    row_bytes = lm.output_size * 4
    lm.use_cache(11 * row_bytes / 2 ** 20)    # room for 11 words' features: the least recently used goes
    assert lm._cache_bytes == 11 * row_bytes and list(lm._cache) == [batch.keys[2], batch.keys[1]]
    lm.use_cache(0)
    assert not lm._cache and torch.allclose(lm(batch, 9), plain, atol=1e-6)


def test_training_with_cached_lm_features_matches_computing_them(tmp_path):
    import json

    fwd = _lm(tmp_path, "fwd")
    losses = []
    for name, mb in (("cached", 64), ("computed", 0)):
        trainer = _classifier(tmp_path, name, lm_features=[str(fwd)], lm_features_cache_mb=mb)
        trainer.cfg.train.max_steps = trainer.cfg.train.eval_every = 8
        trainer.cfg.train.log_every = 1
        trainer.fit()
        assert (trainer.task.model.lm.hits > 0) == (mb > 0)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if r["kind"] == "train"])
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert load_task(tmp_path / "cached" / "best.pt").model.lm.cache_mb == 0     # inference keeps nothing


def test_lm_feature_positions_are_word_boundaries():
    from rnnkit.models.lm_features import LMFeatures


    spec = lambda tokenizer, reverse, vocab: {   # noqa: E731
        "config": {"task": "lm", "data": {"tokenizer": tokenizer, "reverse": reverse, "path": str(SAMPLE_TEXT)},
                   "model": {"embedding_dim": 4, "hidden_size": 4, "num_layers": 1}}, "vocab": vocab}
    chars = ["<unk>", "\n", " ", "a", "b", "c"]
    words = ["<unk>", "</s>", "ab", "c"]
    specs = [spec("char", False, chars), spec("char", True, chars), spec("word", False, words),
             spec("word", True, words)]
    lm = LMFeatures(specs, [language_model(s) for s in specs])
    (f_ids, f_pos), (b_ids, b_pos), (w_ids, w_pos), (r_ids, r_pos) = lm.encode(["ab", "c"])
    text = "\nab c\n"      # a line of the LM's text; backward, "\nc ba\n" as the backward LM read its lines
    assert [chars[i] for i in f_ids] == list(text) and [text[p] for p in f_pos] == ["b", "c"]
    assert [chars[i] for i in b_ids] == list(text[::-1]) and [text[::-1][p] for p in b_pos] == ["a", "c"]
    assert [words[i] for i in w_ids] == ["</s>", "ab", "c"] and w_pos == [1, 2]
    assert [words[i] for i in r_ids] == ["</s>", "c", "ab"] and [words[r_ids[p]] for p in r_pos] == ["ab", "c"]


def test_checkpoints_carry_their_lm_features_and_resume_exactly(tmp_path):
    import json
    import shutil

    fwd = _lm(tmp_path, "fwd")
    features = tmp_path / "features.pt"
    shutil.copy(fwd, features)
    options = {"init_from": str(fwd), "lm_features": [str(features)]}
    data = _labelled(tmp_path)
    train = {"max_steps": 8, "eval_every": 2, "log_every": 1, "batch_size": 4, "layer_lr_decay": 0.5,
             "unfreeze_every": 2, "lr_schedule": "slanted_triangular"}

    def run(name, resume=False, stop=None):
        cfg = {"task": "classification", "run_dir": str(tmp_path / name), "seed": 3,
               "data": {"train": str(data), "valid": str(data)}, "model": {**SIZES, **options}, "train": train}
        trainer = prepare_trainer(load_config(write_yaml(tmp_path / f"{name}.yaml", cfg)), resume=resume)
        if stop:
            step = trainer._step

            def stopping(*args):
                out = step(*args)
                if trainer.progress.step == stop:
                    trainer.stop_signal = "SIGTERM"
                return out
            trainer._step = stopping
        trainer.fit()
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    full = run("full")
    run("part", stop=4)
    features.unlink()                       # a saved run needs its LM files no more
    part = run("part", resume=True)
    assert part == pytest.approx(full, rel=1e-5) and len(full) == 8
    task = load_task(tmp_path / "full" / "best.pt")
    assert task.model.lm is not None and task.predict(["the harbour was calm"], 4)[0] in ("pos", "neg")


def test_tagger_with_characters_takes_the_lm_layer_in_its_word_columns(tmp_path):
    fwd = _lm(tmp_path, "fwd")
    rows = ["the\tDET", "harbour\tNOUN", "was\tAUX", "calm\tADJ", "", "cold\tADJ", "wind\tNOUN", ""]
    data = tmp_path / "tags.txt"
    data.write_text("\n".join(rows * 3) + "\n", encoding="utf-8")
    cfg = {"task": "tagging", "run_dir": str(tmp_path / "tagger"),
           "data": {"format": "columns", "train": str(data), "valid": str(data), "token_column": 1, "tag_column": 2},
           "model": {**SIZES, "char_encoder": True, "init_from": str(fwd), "lm_features": [str(fwd)]},
           "train": {"max_steps": 2, "eval_every": 2, "batch_size": 2}}
    trainer = prepare_trainer(load_config(write_yaml(tmp_path / "tagger.yaml", cfg)))
    lm = load_task(fwd)
    w = trainer.task.model.encoder.rnn.weight_ih_l0          # [words 16 | characters | LM features 16]
    assert w.size(1) > 32 and torch.equal(w[:, :16], lm.model.rnn.weight_ih_l0)
    trainer.fit()
    assert trainer.task.predict(["the wind was cold"], 2)[0].count(" ") == 3


def test_mixed_lm_layers_hold_every_layer_and_learn_only_the_mix(tmp_path):
    from rnnkit.models.lm_features import LMFeatures

    fwd, char = _lm(tmp_path, "fwd"), _lm(tmp_path, "char", tokenizer="char", reverse=True)
    trainer = _classifier(tmp_path, "mix", lm_features=[str(fwd), str(char)], lm_features_layers="all")
    task = trainer.task
    lm = task.model.lm
    # the word LM gives its word vector and both layers, the character LM its two layers; mixed: 16 each
    assert lm.depths == [3, 2] and lm.state_size == 5 * 16 and lm.output_size == 32
    assert task.model.encoder.rnn.input_size == 16 + 32
    top = LMFeatures(lm.specs, [language_model(s) for s in lm.specs])
    top.lms.load_state_dict(lm.lms.state_dict())
    batch = lm.collate([lm.encode("the harbour was calm".split())], task.device)
    states, plain = lm.states(batch, 4), top(batch, 4)
    word_lm = lm.lms[0]
    ids, positions = batch.inputs[0]
    assert torch.allclose(states[0, :, :16], word_lm.embed(ids)[0, positions[0]])        # the word vectors
    assert torch.allclose(states[0, :, 32:48], plain[0, :, :16], atol=1e-6)             # the word LM's top layer
    assert torch.allclose(states[0, :, 64:80], plain[0, :, 16:], atol=1e-6)             # the character LM's
    assert not torch.allclose(states[0, :, 16:32], states[0, :, 32:48])                 # a lower layer differs
    with torch.no_grad():                     # all weight on the top layers, scaled: the top features, scaled
        lm.mix.copy_(torch.tensor([[-1e4, -1e4, 0.0], [-1e4, 0.0, -1e4]]))
        lm.scale.copy_(torch.tensor([2.0, 0.5]))
    mixed = lm(batch, 4)
    assert torch.allclose(mixed[..., :16], 2 * plain[..., :16], atol=1e-5)
    assert torch.allclose(mixed[..., 16:], 0.5 * plain[..., 16:], atol=1e-5)
    with torch.no_grad():
        lm.mix.zero_()
        lm.scale.fill_(1.0)
    frozen = {k: v.clone() for k, v in lm.lms.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(frozen[k], v) for k, v in lm.lms.state_dict().items())
    assert lm.mix.abs().sum() > 0 and not torch.equal(lm.scale, torch.ones(2))        # the mix was trained
    loaded = load_task(tmp_path / "mix" / "last.pt").model.lm
    assert loaded.layers == "all" and torch.equal(loaded.mix, lm.mix)
    assert torch.allclose(loaded(batch, 4), lm(batch, 4), atol=1e-6)
    with pytest.raises(ConfigError, match="model.lm_features_layers: there are no model.lm_features to mix"):
        _classifier(tmp_path, "none", lm_features_layers="all")


def test_init_layers_limits_what_init_from_copies(tmp_path):
    fwd = _lm(tmp_path, "fwd")
    lm = load_task(fwd)
    fresh = _classifier(tmp_path, "fresh", hidden_size=24).task
    # 0: the word vectors only, so the encoder may have any size
    task = _classifier(tmp_path, "vectors", init_from=str(fwd), init_layers=0, hidden_size=24).task
    row = task.words.stoi["harbour"]
    assert torch.equal(task.model.embedding.weight[row], lm.model.embedding.weight[lm.vocab.stoi["harbour"]])
    assert all(torch.equal(a, b) for a, b in zip(task.model.encoder.rnn.parameters(), fresh.model.encoder.rnn.parameters()))
    # 1: the lowest layer too, not the second
    task = _classifier(tmp_path, "one", init_from=str(fwd), init_layers=1).task
    rnn = task.model.encoder.rnn
    assert torch.equal(rnn.weight_hh_l0, lm.model.rnn.weight_hh_l0)
    assert not torch.equal(rnn.weight_hh_l1, lm.model.rnn.weight_hh_l1)
    with pytest.raises(ConfigError, match="model.init_from: .* has hidden_size 16, this model model.hidden_size 24"):
        _classifier(tmp_path, "bad", init_from=str(fwd), init_layers=1, hidden_size=24)
    with pytest.raises(ConfigError, match="model.init_layers: there is no model.init_from"):
        _classifier(tmp_path, "none", init_layers=0)


def test_frozen_embeddings_keep_the_lm_vectors_through_training(tmp_path):
    fwd = _lm(tmp_path, "fwd")
    trainer = _classifier(tmp_path, "static", init_from=str(fwd), init_layers=0, hidden_size=24,
                          freeze_embeddings=True)
    model = trainer.task.model
    vectors, rnn = model.embedding.weight.detach().clone(), model.encoder.rnn.weight_hh_l0.detach().clone()
    trainer.fit()
    assert torch.equal(model.embedding.weight, vectors) and not torch.equal(model.encoder.rnn.weight_hh_l0, rnn)
    loaded = load_task(tmp_path / "static" / "last.pt").model
    assert torch.equal(loaded.embedding.weight, vectors) and not loaded.embedding.weight.requires_grad
