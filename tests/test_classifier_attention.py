"""Attention beyond the encoder-decoder, for classifiers: attention hops with their penalty,
documents (JSON Lines and CoNLL-U treebanks) and the hierarchical attention network, and what
``predict --attention`` shows of them."""
from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.data.documents import read_documents
from rnnkit.data.vocab import DataError
from rnnkit.models.labeling import HierarchicalClassifier, SentenceClassifier, hop_penalty
from rnnkit.models.rnn import length_mask
from tests.conftest import ROOT, write_yaml

runner = CliRunner()
EWT = ROOT.parent / "shared" / "data" / "ud-english-ewt"
SENTENCES = ["pos\tbright calm water", "neg\tgrey storm water", "pos\ta calm bright day", "neg\tcold grey wind"]


def _sentences(tmp_path):
    path = tmp_path / "s.tsv"
    path.write_text("\n".join(SENTENCES * 6) + "\n", encoding="utf-8")
    return path


def _documents(tmp_path, n: int = 40, seed: int = 0):
    """Documents whose label is told by one sentence among fillers."""
    rng = random.Random(seed)
    cue = {"pos": "bright calm warm sunny".split(), "neg": "grey cold storm sad".split()}
    filler = "the a day water wind is was".split()
    path = tmp_path / f"docs{seed}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            sents = [" ".join(rng.choice(filler) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(1, 4))]
            sents.insert(rng.randint(0, len(sents)), f"it was {rng.choice(cue[label])}")
            f.write(json.dumps({"label": label, "sentences": sents}) + "\n")
    return path


def _train(tmp_path, name: str, data: dict, model: dict, train: dict | None = None):
    cfg = {"task": "classification", "run_dir": str(tmp_path / name), "seed": 1, "data": data,
           "model": {"embedding_dim": 8, "hidden_size": 8, "dropout": 0.0, **model},
           "train": {"max_steps": 12, "eval_every": 6, "batch_size": 8, **(train or {})}}
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / f"{name}.yaml", cfg))])
    assert result.exit_code == 0, result.output
    return tmp_path / name / "best.pt"


# ------------------------------------------------------------------ attention hops
def test_one_hop_is_the_attention_pooling_as_it_was():
    torch.manual_seed(0)
    model = SentenceClassifier(30, 3, 8, "lstm", 8, 1, 0.0, "attention").eval()
    names = {k for k in model.state_dict() if k.startswith("attention.")}
    assert names == {"attention.0.weight", "attention.0.bias", "attention.2.weight"}   # checkpoints load
    words, lengths = torch.randint(2, 30, (3, 6)), torch.tensor([6, 4, 1])
    words[1, 4:] = 0
    words[2, 1:] = 0
    logits, weights = model(words, lengths)
    # the pooling as written before hops existed
    states, _ = model.encoder(model.embedding(words), lengths)
    scores = nn.Sequential.forward(model.attention, states).squeeze(-1).masked_fill(
        ~length_mask(lengths, 6), float("-inf"))
    old = torch.softmax(scores.float(), -1)
    pooled = torch.bmm(old.unsqueeze(1).to(states.dtype), states).squeeze(1)
    assert torch.equal(weights, old) and torch.equal(logits, model.output(pooled))


def test_hops_each_weigh_the_words_to_one_and_are_concatenated():
    torch.manual_seed(0)
    model = SentenceClassifier(30, 3, 8, "gru", 8, 1, 0.0, "attention", hops=3).eval()
    assert model.output.in_features == 3 * 16
    words, lengths = torch.randint(2, 30, (2, 5)), torch.tensor([5, 2])
    words[1, 2:] = 0
    _, weights = model(words, lengths)
    assert weights.shape == (2, 3, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3)) and torch.all(weights[1, :, 2:] == 0)


def test_the_hop_penalty_is_zero_for_orthogonal_hops_and_positive_otherwise():
    apart = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1.0, 0]]])          # each hop on a word of its own
    assert hop_penalty(apart).item() == 0.0
    same = torch.tensor([[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0]]])        # both hops on the same words
    spread = torch.full((1, 2, 4), 0.25)
    assert hop_penalty(same).item() == pytest.approx(1.0) and hop_penalty(spread).item() > 0.5
    x = torch.randn(2, 3, 6, requires_grad=True)
    hop_penalty(torch.softmax(x, -1)).backward()                          # it trains
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_predict_shows_each_hop_and_writes_an_html_page(tmp_path):
    ckpt = _train(tmp_path, "hops", {"train": str(_sentences(tmp_path)), "valid": str(_sentences(tmp_path))},
                  {"pooling": "attention", "attention_hops": 2}, {"attention_penalty": 0.1})
    page = tmp_path / "a.html"
    out = runner.invoke(app, ["predict", str(ckpt), "--attention", "--hops", "--attention-html", str(page)],
                        input="calm grey water\n\nbright <day>\n")
    assert out.exit_code == 0, out.output
    lines = out.stdout.split("\n")[:3]
    assert lines[1] == ""
    fields = lines[0].split("\t")
    assert fields[0] in ("pos", "neg") and len(fields) == 4           # label, mean, hop 1, hop 2
    for f in fields[1:]:
        pairs = [p.rsplit(":", 1) for p in f.split()]
        assert [w for w, _ in pairs] == ["calm", "grey", "water"]
        assert sum(float(a) for _, a in pairs) == pytest.approx(1.0, abs=2e-3)
    mean = [float(p.rsplit(":", 1)[1]) for p in fields[1].split()]
    hop = [[float(p.rsplit(":", 1)[1]) for p in f.split()] for f in fields[2:]]
    assert mean == pytest.approx([(a + b) / 2 for a, b in zip(*hop)], abs=2e-3)
    text = page.read_text()
    assert text.count("<section>") == 2 and "hop 2" in text and "&lt;day&gt;" in text and "<day>" not in text
    import rnnkit

    got = rnnkit.load(ckpt).predict(["calm grey water"])[0]
    assert len(got["hops"]) == 2 and [w for w, _ in got["attention"]] == ["calm", "grey", "water"]


@pytest.mark.parametrize("model,train,flags,words", [
    ({"pooling": "max", "attention_hops": 2}, {}, None, "model.attention_hops: 2 hops need model.pooling: attention"),
    ({"pooling": "attention"}, {"attention_penalty": 0.5}, None, "train.attention_penalty: needs model.attention_hops"),
    ({"pooling": "attention", "attention_hops": 0}, {}, None, "model.attention_hops"),
    ({"pooling": "max"}, {}, ["--attention"], "need a classifier with model.pooling: attention"),
    ({"pooling": "attention"}, {}, ["--attention", "--hops"], "--hops needs a classifier with model.attention_hops"),
])
def test_hops_and_their_options_are_checked(tmp_path, model, train, flags, words):
    data = {"train": str(_sentences(tmp_path)), "valid": str(_sentences(tmp_path))}
    if flags is None:
        cfg = {"task": "classification", "run_dir": str(tmp_path / "r"), "data": data, "model": model,
               "train": train}
        result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "c.yaml", cfg))])
    else:
        ckpt = _train(tmp_path, "r", data, model)
        result = runner.invoke(app, ["predict", str(ckpt), *flags], input="calm water\n")
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_penalty_is_refused_by_other_tasks(tmp_path):
    from tests.conftest import tiny_lm_config

    cfg = tiny_lm_config(tmp_path)
    cfg["train"]["attention_penalty"] = 0.1
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "lm.yaml", cfg))])
    assert result.exit_code == 2 and "task 'lm' has no attention hops" in result.output, result.output


# ------------------------------------------------------------------ documents
def test_conllu_documents_are_grouped_at_newdoc_lines(tmp_path):
    def sent(*words):
        return [f"{i}\t{w}\t_\t_\t_\t_\t_\t_\t_\t_" for i, w in enumerate(words, start=1)] + [""]
    rows = ["# newdoc id = reviews-0001", "# sent_id = a", *sent("Good", "food", "."), *sent("Go", "there"),
            "# newdoc id = email-enron-7", *sent("Hi", "all"), "1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_",
            *sent("do", "n't"), "# newdoc id = reviews-0002", *sent("Bad", ".")]
    path = tmp_path / "t.conllu"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    docs = read_documents(str(path), "newdoc_prefix")
    assert [d.label for d in docs] == ["reviews", "email", "reviews"]
    assert docs[0].sentences == [["Good", "food", "."], ["Go", "there"]] and docs[1].sentences[1] == ["do", "n't"]
    assert read_documents(str(path), "newdoc_prefix", max_sentences=1)[0].sentences == [["Good", "food", "."]]
    bare = tmp_path / "bare.conllu"
    bare.write_text("\n".join(sent("no", "breaks")) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1: a sentence before the first '# newdoc id' line"):
        read_documents(str(bare), "newdoc_prefix")
    empty = tmp_path / "nodoc.conllu"
    empty.write_text("# sent_id = x\n", encoding="utf-8")
    with pytest.raises(DataError, match="no document breaks"):
        read_documents(str(empty), "newdoc_prefix")


@pytest.mark.parametrize("line,words", [
    ("not json", "line 2: not a JSON object"),
    ('{"label": "pos"}', "line 2: expected a JSON object with a list under \"sentences\""),
    ('{"sentences": ["a b"]}', "line 2: the document has no \"label\""),
    ('{"label": "pos", "sentences": [" "]}', "line 2: the document has no words"),
])
def test_a_bad_json_lines_document_names_its_line(tmp_path, line, words):
    path = tmp_path / "d.jsonl"
    path.write_text('{"label": "pos", "sentences": ["a b", ["c", "d"]]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=words.replace('"', '.').replace("(", ".").replace(")", ".")):
        read_documents(str(path))


@pytest.mark.parametrize("task,data,model,words", [
    ("classification", {"format": "lines"}, {"hierarchical": True}, "model.hierarchical: needs data.format: documents"),
    ("classification", {"format": "documents", "train": "x.conllu"}, {}, "data.label_from: data.train is CoNLL-U"),
    ("classification", {"label_from": "newdoc_prefix"}, {}, "data.label_from: is for data.format: documents"),
    ("classification", {"format": "documents"}, {"hierarchical": True, "attention_hops": 2},
     "model.attention_hops: the hierarchical network attends once"),
    ("tagging", {}, {"hierarchical": True}, "model.hierarchical: unknown key"),
])
def test_document_settings_are_checked(tmp_path, task, data, model, words):
    docs = _documents(tmp_path)
    base = {"train": str(docs), "valid": str(docs)} if task == "classification" else \
        {"format": "columns", "train": str(docs), "valid": str(docs)}
    cfg = {"task": task, "run_dir": str(tmp_path / "r"), "data": {**base, **data}, "model": model}
    result = runner.invoke(app, ["train", str(write_yaml(tmp_path / "c.yaml", cfg))])
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def _hierarchical_model() -> HierarchicalClassifier:
    torch.manual_seed(0)
    return HierarchicalClassifier(40, 3, 8, "gru", 8, 1, 0.0).eval()


def _batch(docs):
    s = max(len(d) for d in docs)
    width = max(len(x) for d in docs for x in d)
    words = torch.zeros(len(docs), s, width, dtype=torch.long)
    counts = torch.zeros(len(docs), s, dtype=torch.long)
    for i, d in enumerate(docs):
        for j, sent in enumerate(d):
            words[i, j, :len(sent)] = torch.tensor(sent)
            counts[i, j] = len(sent)
    return words, counts, torch.tensor([len(d) for d in docs])


def test_padding_at_both_levels_leaves_the_results_unchanged():
    model = _hierarchical_model()
    doc = [[5, 6, 7], [8, 9]]
    others = [[[3] * 9, [4] * 2, [5, 6], [7] * 4], [[11, 12, 13, 14, 15, 16]]]   # more sentences, longer ones
    alone, (s_alone, w_alone) = model(*_batch([doc]))
    together, (s_all, w_all) = model(*_batch([others[0], doc, others[1]]))
    assert torch.allclose(alone[0], together[1], atol=1e-6)
    assert torch.allclose(s_alone[0], s_all[1, :2], atol=1e-6) and torch.all(s_all[1, 2:] == 0)
    assert torch.allclose(w_alone[0, :, :3], w_all[1, :2, :3], atol=1e-6) and torch.all(w_all[1, :, 3:] == 0)
    assert torch.allclose(s_all.sum(-1), torch.ones(3)) and torch.allclose(w_all[0].sum(-1), torch.ones(4))


def test_a_hierarchical_classifier_trains_scores_and_shows_both_levels(tmp_path):
    docs = _documents(tmp_path)
    ckpt = _train(tmp_path, "han", {"format": "documents", "train": str(docs), "valid": str(docs)},
                  {"hierarchical": True}, {"metric": "valid_macro_f1", "metric_mode": "max"})
    ev = runner.invoke(app, ["eval", str(ckpt), "--data", str(docs), "--json"])
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["documents"] == 40
    first = docs.read_text().splitlines()[0]
    sentences = json.loads(first)["sentences"]
    out = runner.invoke(app, ["predict", str(ckpt), "--attention"], input=first + "\n\n" + first + "\n")
    assert out.exit_code == 0, out.output
    rows = out.stdout.split("\n")[:3]
    assert rows[1] == "" and rows[0] == rows[2]
    label, shown = rows[0].split("\t")
    parts = shown.split(" | ")
    assert len(parts) == len(sentences)
    weights = [float(p.split("]")[0].lstrip("[")) for p in parts]
    assert sum(weights) == pytest.approx(1.0, abs=3e-3)
    assert [[w.rsplit(":", 1)[0] for w in p.split("] ")[1].split()] for p in parts] == [s.split() for s in sentences]
    bad = runner.invoke(app, ["predict", str(ckpt)], input=first + "\nnot a document\n")
    assert bad.exit_code == 2 and "line 2: not a JSON object" in bad.output
    export = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "x")])
    assert export.exit_code == 2 and "model.hierarchical" in export.output


def test_the_flat_classifier_reads_a_document_as_one_sequence(tmp_path):
    docs = _documents(tmp_path)
    ckpt = _train(tmp_path, "flat", {"format": "documents", "train": str(docs), "valid": str(docs),
                                     "max_sentences": 2}, {"pooling": "attention"})
    import rnnkit

    model = rnnkit.load(ckpt)
    doc = {"sentences": ["it was calm", "the day"]}
    got = model.predict([json.dumps(doc)])[0]
    assert [w for w, _ in got["attention"]] == "it was calm the day".split()


@pytest.mark.skipif(not EWT.is_dir(), reason="../shared/data/ud-english-ewt is absent")
def test_the_ewt_treebank_reads_as_its_documents():
    docs = read_documents(str(EWT / "en_ewt-ud-train.conllu"), "newdoc_prefix")
    labels = [d.label for d in docs]
    assert len(docs) == 540 and labels.count("reviews") == 347
    assert set(labels) == {"answers", "email", "newsgroup", "reviews", "weblog"}
    assert len(read_documents(str(EWT / "en_ewt-ud-dev.conllu"), "newdoc_prefix")) == 318
    assert len(read_documents(str(EWT / "en_ewt-ud-test.conllu"), "newdoc_prefix")) == 316


def test_a_terminal_shades_each_word_by_its_weight():
    from rnnkit.cli.attention_view import terminal_lines

    entry = {"label": "pos", "probability": 0.9, "attention": [("a", 0.1), ("fine", 0.7), ("film", 0.2)],
             "hops": [[("a", 0.0), ("fine", 1.0), ("film", 0.0)], [("a", 0.2), ("fine", 0.4), ("film", 0.4)]]}
    lines = terminal_lines(entry, probs=True, hops=True)
    assert [line.plain for line in lines] == ["pos\t0.9000\ta fine film", "  hop 1: a fine film",
                                              "  hop 2: a fine film"]
    styles = {lines[0].plain[s.start:s.end]: str(s.style) for s in lines[0].spans}
    assert styles["fine"] == "black on rgb(255,170,60)"                  # the line's largest weight: full colour
    assert styles["film"] != styles["fine"] and styles["a"] not in (styles["fine"], styles["film"])
    doc = {"label": "email", "probability": 0.5, "sentences": [{"weight": 0.8, "words": [("Hi", 1.0)]},
                                                                {"weight": 0.2, "words": [("Bye", 1.0)]}]}
    assert [line.plain for line in terminal_lines(doc, False, False)] == ["email", "  [0.800] Hi", "  [0.200] Bye"]
