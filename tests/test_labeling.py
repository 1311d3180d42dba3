"""Sequence labeling and sentence classification: CRF, spans, readers, tasks, predict."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.data.labeled import read_tagged
from rnnkit.data.vocab import DataError
from rnnkit.models.crf import CRF
from rnnkit.models.labeling import CharEncoder, length_mask
from rnnkit.spans import span_scores, spans
from tests.conftest import write_yaml

runner = CliRunner()


# ---------------------------------------------------------------------------- CRF
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crf_partition_and_viterbi_equal_brute_force_with_padding(seed):
    torch.manual_seed(seed)
    num_tags, width = 3, 4
    crf = CRF(num_tags).double()
    emissions = torch.randn(4, width, num_tags, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 1, 3])
    mask = length_mask(lengths, width)
    log_z, paths = crf.log_partition(emissions, mask), crf.decode(emissions, mask)
    for b, n in enumerate(lengths.tolist()):
        scored = {}
        for seq in itertools.product(range(num_tags), repeat=n):
            tags = torch.tensor([list(seq) + [0] * (width - n)])
            scored[seq] = crf.score(emissions[b:b + 1], tags, mask[b:b + 1]).item()
        brute = torch.logsumexp(torch.tensor(list(scored.values()), dtype=torch.float64), 0).item()
        assert log_z[b].item() == pytest.approx(brute, abs=1e-10)
        assert tuple(paths[b]) == max(scored, key=scored.get)
    nll = crf.nll(emissions, torch.zeros(4, width, dtype=torch.long), mask)
    assert torch.all(nll > 0)       # a probability below one


# ---------------------------------------------------------------------------- spans
def test_spans_read_as_conlleval_does():
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert spans(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 2)]                 # I- without B- starts one
    assert spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]   # a type change splits it
    assert spans(["S-PER", "S-PER", "B-ORG", "E-ORG", "S-LOC"]) == [("PER", 0, 0), ("PER", 1, 1), ("ORG", 2, 3),
                                                                     ("LOC", 4, 4)]   # BIOES singletons
    assert spans(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]


def test_span_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["S-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["S-ORG", "B-LOC"]]
    s = span_scores(gold, pred)
    # gold: PER, LOC, ORG; predicted: PER (right), ORG (right), LOC at another place (wrong)
    assert s["overall"]["precision"] == pytest.approx(2 / 3) and s["overall"]["recall"] == pytest.approx(2 / 3)
    assert s["PER"]["f1"] == 1.0 and s["LOC"]["f1"] == 0.0 and s["LOC"]["support"] == 1


def test_span_scores_equal_seqeval_on_random_tags():
    from seqeval import metrics as seqeval   # a test dependency: the reference implementation
    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 9))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
    ours = span_scores(gold, pred)["overall"]
    assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred))
    assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred))


# ---------------------------------------------------------------------------- readers
def test_conllu_skips_ranges_and_empty_nodes_and_reports_bad_lines(tmp_path):
    good = tmp_path / "a.conllu"
    row = "{}\t{}\t_\t{}\t_\t_\t_\t_\t_\t_"
    good.write_text("\n".join(["# sent_id = 1", row.format("1-2", "don't", "_"), row.format(1, "do", "AUX"),
                               row.format(2, "n't", "PART"), row.format("2.1", "x", "X"), "",
                               row.format(1, "Hi", "INTJ"), ""]) + "\n")
    s = read_tagged(str(good), "conllu", 2, 4)
    assert [x.tokens for x in s] == [["do", "n't"], ["Hi"]] and s[0].tags == ["AUX", "PART"]
    bad = tmp_path / "b.conllu"
    bad.write_text(row.format(1, "a", "X") + "\n" + "2\tb\tX\n")
    with pytest.raises(DataError, match=r"b.conllu: line 2: expected 10 tab-separated"):
        read_tagged(str(bad), "conllu", 2, 4)


def test_column_file_reports_short_lines(tmp_path):
    f = tmp_path / "n.iob2"
    f.write_text("# c\n1\tJohn\tB-PER\n2\tran\tO\n")
    assert read_tagged(str(f), "columns", 2, 3)[0].tags == ["B-PER", "O"]
    f.write_text("# c\n1\tJohn\tB-PER\n2\tran\tO\n\n1\tbad\n")
    with pytest.raises(DataError, match=r"n.iob2: line 5: expected at least 3 columns"):
        read_tagged(str(f), "columns", 2, 3)


def test_char_encoder_gives_unseen_words_vectors_of_their_own():
    torch.manual_seed(0)
    enc = CharEncoder(10, 4, 5)
    chars = torch.tensor([[[2, 3, 4], [5, 6, 0], [5, 6, 0]]])   # 3 words, none in any word vocabulary
    out = enc(chars, torch.tensor([[True, True, True]]))
    assert out.shape == (1, 3, 10)
    assert not torch.allclose(out[0, 0], out[0, 1]) and torch.allclose(out[0, 1], out[0, 2])
    with torch.no_grad():   # each final state is read at the word's own last character
        x = enc.embedding(torch.tensor([[5, 6]]))
        expected = torch.cat([enc.forward_rnn(x)[0][0, -1], enc.backward_rnn(x.flip(1))[0][0, -1]])
    assert torch.allclose(out[0, 1], expected, atol=1e-6)


# ---------------------------------------------------------------------------- tasks end to end
def _tagging_files(tmp_path):
    """A tiny grammar: determiners, nouns, verbs; entity-like names get B-/I- tags."""
    rng = random.Random(1)
    det, noun, verb = ["the", "a"], ["cat", "dog", "bird"], ["sees", "likes"]
    names = [["Ann"], ["Bob", "Smith"]]
    lines = []
    for _ in range(40):
        name = rng.choice(names)
        words = [(w, "B-PER" if i == 0 else "I-PER") for i, w in enumerate(name)]
        words += [(rng.choice(verb), "O"), (rng.choice(det), "O"), (rng.choice(noun), "O")]
        lines += [f"{i + 1}\t{w}\t{t}" for i, (w, t) in enumerate(words)] + [""]
    path = tmp_path / "tags.iob2"
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tmp_path, cfg):
    path = write_yaml(tmp_path / "c.yaml", cfg)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return tmp_path / "run" / "best.pt"


@pytest.mark.parametrize("output", ["softmax", "crf"])
def test_tiny_tagging_set_overfits_and_predict_keeps_lines(tmp_path, output):
    data = _tagging_files(tmp_path)
    ckpt = _train(tmp_path, {
        "task": "tagging", "run_dir": str(tmp_path / "run"), "seed": 1,
        "data": {"format": "columns", "train": str(data), "valid": str(data), "token_column": 2, "tag_column": 3},
        "model": {"embedding_dim": 16, "hidden_size": 16, "num_layers": 1, "dropout": 0.0, "output": output,
                  "char_embedding_dim": 8, "char_hidden_size": 8},
        "train": {"max_steps": 60, "eval_every": 30, "batch_size": 8, "lr": 0.02, "metric": "valid_f1",
                  "metric_mode": "max"}})
    result = runner.invoke(app, ["eval", str(ckpt), "--data", str(data), "--json"])
    scores = json.loads(result.stdout)
    assert scores["accuracy"] == 1.0 and scores["f1"] == 1.0 and scores["per_type"]["PER"]["support"] == 40
    src = tmp_path / "in.txt"
    src.write_text("Bob Smith sees the cat\n\nAnn likes a dog\nZed sees a bird\n")
    result = runner.invoke(app, ["predict", str(ckpt), "-i", str(src), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n")[:4] == ["B-PER I-PER O O O", "", "B-PER O O O", result.stdout.split("\n")[3]]
    assert len(result.stdout.split("\n")[3].split()) == 4 and result.stdout.count("\n") == 4


def test_tiny_classification_set_overfits_and_predicts_with_probabilities(tmp_path):
    rng = random.Random(2)
    good, bad = ["great", "fine", "lovely"], ["awful", "dull", "poor"]
    rows = []
    for _ in range(60):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(good if label == "pos" else bad)
        rows.append(f"{label}\tthe film was {word} and long")
    data = tmp_path / "s.tsv"
    data.write_text("\n".join(rows) + "\n")
    ckpt = _train(tmp_path, {
        "task": "classification", "run_dir": str(tmp_path / "run"), "seed": 1,
        "data": {"train": str(data), "valid": str(data)},
        "model": {"embedding_dim": 16, "hidden_size": 16, "dropout": 0.0, "pooling": "attention"},
        "train": {"max_steps": 40, "eval_every": 20, "batch_size": 16, "lr": 0.02, "metric": "valid_accuracy",
                  "metric_mode": "max"}})
    scores = json.loads(runner.invoke(app, ["eval", str(ckpt), "--data", str(data), "--json"]).stdout)
    assert scores["accuracy"] == 1.0 and scores["macro_f1"] == 1.0
    assert sum(map(sum, scores["confusion"])) == 60
    result = runner.invoke(app, ["predict", str(ckpt), "--probs", "--attention"],
                           input="the film was lovely and long\n\nthe film was dull and long\n")
    out = result.stdout.split("\n")
    assert out[0].startswith("pos\t") and out[1] == "" and out[2].startswith("neg\t") and len(out) == 4
    label, prob, weights = out[0].split("\t")
    assert 0.5 < float(prob) <= 1.0
    assert [w.split(":")[0] for w in weights.split()] == "the film was lovely and long".split()
    assert sum(float(w.split(":")[1]) for w in weights.split()) == pytest.approx(1.0, abs=0.01)


def test_malformed_data_is_one_line_with_its_line_number(tmp_path):
    data = tmp_path / "bad.tsv"
    data.write_text("pos\tgood film\nno tab here\n")
    cfg = write_yaml(tmp_path / "c.yaml", {"task": "classification", "run_dir": str(tmp_path / "run"),
                                           "data": {"train": str(data), "valid": str(data)}})
    result = runner.invoke(app, ["train", str(cfg)])
    assert result.exit_code == 2 and "bad.tsv: line 2: expected 'label<TAB>text'" in result.output
    assert "Traceback" not in result.output


def test_tagger_resume_continues_the_same_loss_curve(tmp_path):
    data = _tagging_files(tmp_path)

    def config(name, steps):
        return write_yaml(tmp_path / f"{name}.yaml", {
            "task": "tagging", "run_dir": str(tmp_path / name), "seed": 3,
            "data": {"format": "columns", "train": str(data), "valid": str(data), "token_column": 2,
                     "tag_column": 3},
            "model": {"embedding_dim": 8, "hidden_size": 8, "num_layers": 1, "dropout": 0.2, "word_dropout": 0.2,
                      "char_embedding_dim": 4, "char_hidden_size": 4, "output": "crf"},
            "train": {"max_steps": steps, "eval_every": 4, "log_every": 1, "batch_size": 8}})

    assert runner.invoke(app, ["train", str(config("full", 12))]).exit_code == 0
    assert runner.invoke(app, ["train", str(config("part", 8))]).exit_code == 0
    assert runner.invoke(app, ["train", str(config("part", 12)), "--resume"]).exit_code == 0

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert len(losses("part")) == 12   # 5 batches an epoch: both runs cross into new epochs
    assert losses("full") == pytest.approx(losses("part"), rel=1e-5)
