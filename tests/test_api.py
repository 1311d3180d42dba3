"""``rnnkit.load``: the Python API gives what the commands print, for every task."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli import app
from rnnkit.config import ConfigError
from rnnkit.data.vocab import DataError
from tests.conftest import write_yaml
from tests.test_forecast import seasonal_series, write_csv
from tests.test_forecast import train as train_forecaster
from tests.test_translation_task import train as train_translator

runner = CliRunner()


def cli(*args: str, stdin: str | None = None) -> str:
    result = runner.invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def lm_checkpoint(tmp_path, lm_config_file):
    cli("train", str(lm_config_file), "--set", "train.max_steps=10")
    return tmp_path / "run" / "best.pt"


def test_translator_matches_the_command(tmp_path):
    ckpt = train_translator(tmp_path)
    lines = ["the cat sees the dog", "", "a small bird sings", "the dog"]
    m = rnnkit.load(ckpt)
    assert isinstance(m, rnnkit.api.Translator) and m.kind == "translation"
    for beam in (1, 3):
        printed = cli("translate", str(ckpt), "--beam", str(beam), stdin="\n".join(lines) + "\n")
        assert "".join(t + "\n" for t in m.translate(lines, beam=beam)) == printed
    nbest = m.translate(lines, beam=3, n_best=2)
    printed = cli("translate", str(ckpt), "--beam", "3", "--n-best", "2", stdin="\n".join(lines) + "\n")
    assert "".join(" ||| ".join(h) + "\n" for h in nbest) == printed
    assert m.translate("the dog") == m.translate(["the dog"])
    # computed apart from the decoder: greedy output is the argmax at every step of a teacher-forced
    # pass over it, and each hypothesis's score is its log-probability under that pass
    task = m.task
    for line in lines:
        if not line:
            continue
        for beam in (1, 3):
            hyp = m.translations([line], beam=beam)[0]
            ids, logp = _teacher_forced(task, line, hyp.tgt_tokens)
            if beam == 1:
                assert logp[: len(ids)].argmax(-1).tolist() == ids
            gold = ids + [task.eos]
            with_eos = sum(logp[i, g].item() for i, g in enumerate(gold))
            assert hyp.score == pytest.approx(with_eos, abs=1e-3) or \
                hyp.score == pytest.approx(with_eos - logp[len(ids), task.eos].item(), abs=1e-3)   # cut at the cap
    with pytest.raises(ConfigError, match="cannot exceed"):
        m.translate(lines, beam=1, n_best=2)


def _teacher_forced(task, line: str, tokens: list[str]) -> tuple[list[int], torch.Tensor]:
    """Target ids of ``tokens`` and the model's log-probabilities (T + 1, V) for them given ``line``."""
    src = task.src_tok.vocab.encode(task.src_tok.split(line))
    ids = task.tgt_tok.vocab.encode(tokens)
    task.model.eval()
    with torch.no_grad():
        logits = task.model(torch.tensor([src]), torch.tensor([len(src)]), torch.tensor([[task.bos] + ids]))
    return ids, logits.log_softmax(-1)[0]


def test_language_model_matches_the_command(lm_checkpoint, tmp_path):
    m = rnnkit.load(lm_checkpoint)
    text = m.generate("The", 40, seed=3)
    assert cli("generate", str(lm_checkpoint), "--prime", "The", "--length", "40", "--seed", "3") == "The" + text + "\n"
    sample = tmp_path / "sample.txt"
    sample.write_text("The harbour was quiet in the morning.\n" * 20, encoding="utf-8")
    printed = json.loads(cli("eval", str(lm_checkpoint), "--data", str(sample), "--json"))
    assert m.score(sample.read_text(encoding="utf-8")) == printed
    # computed apart from the scorer: one forward pass over the text as one stream
    task = m.task
    task.model.eval()
    ids = task.encode(sample.read_text(encoding="utf-8"))
    with torch.no_grad():
        logp = task.model.log_probs(task.model.features(torch.tensor([ids[:-1]])).output)[0]
    nll = -logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).mean().item()
    one = json.loads(cli("eval", str(lm_checkpoint), "--data", str(sample), "--streams", "1", "--json"))
    assert one["loss"] == pytest.approx(nll, rel=1e-5)
    # and sampling from the single likeliest token is the argmax chain of a forward pass over it
    greedy = cli("generate", str(lm_checkpoint), "--prime", "The", "--length", "30", "--top-k", "1")
    chain = task.encode(greedy.rstrip("\n"))
    with torch.no_grad():
        best = task.model.log_probs(task.model.features(torch.tensor([chain[:-1]])).output)[0].argmax(-1)
    assert len(chain) == 33 and best[2:].tolist() == chain[3:]
    with pytest.raises(ConfigError, match="temperature"):
        m.generate("x", 3, temperature=0)


def _labelled_files(tmp_path):
    lines = ["pos\tbright calm water", "neg\tgrey storm water", "pos\ta calm bright day", "neg\tcold grey wind"] * 4
    path = tmp_path / "labels.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["calm\tADJ", "water\tNOUN", "", "grey\tADJ", "wind\tNOUN", "", "bright\tADJ", "day\tNOUN", ""]
    tags = tmp_path / "tags.txt"
    tags.write_text("\n".join(rows * 4) + "\n", encoding="utf-8")
    return path, tags


def test_tagger_and_classifier_match_the_command(tmp_path):
    labels, tags = _labelled_files(tmp_path)
    small = {"embedding_dim": 8, "hidden_size": 8, "num_layers": 1}
    configs = {
        "cls": {"task": "classification", "data": {"train": str(labels), "valid": str(labels)},
                "model": {**small, "pooling": "attention"}},
        "tag": {"task": "tagging", "data": {"format": "columns", "train": str(tags), "valid": str(tags),
                                            "token_column": 1, "tag_column": 2}, "model": small},
    }
    for name, cfg in configs.items():
        cfg.update(run_dir=str(tmp_path / name), train={"max_steps": 6, "eval_every": 6, "batch_size": 4})
        cli("train", str(write_yaml(tmp_path / f"{name}.yaml", cfg)))
    lines = ["calm grey water", "", "bright day", "unseen words here"]
    stdin = "\n".join(lines) + "\n"
    cls = rnnkit.load(tmp_path / "cls" / "best.pt")
    got = cls.predict(lines)
    assert got[1] is None and set(got[0]["probabilities"]) == {"pos", "neg"}
    assert abs(sum(got[0]["probabilities"].values()) - 1) < 1e-5
    printed = cli("predict", str(tmp_path / "cls" / "best.pt"), "--probs", "--attention", stdin=stdin)
    from rnnkit.tasks.classifier_text import format_prediction

    assert "".join(format_prediction(d, True, True) + "\n" for d in got) == printed
    task = cls.task
    task.model.eval()
    for line, d in zip(lines, got):       # computed apart: the model on the sentence's word ids alone
        if not line:
            continue
        words = torch.tensor([task.words.encode(line.split())])
        with torch.no_grad():
            scores, weights = task.model(words, torch.tensor([words.size(1)]))
        probs = scores.softmax(-1)[0]
        assert d["probabilities"] == pytest.approx(dict(zip(task.labels, probs.tolist())), abs=1e-5)
        assert d["label"] == task.labels[int(probs.argmax())]
        assert [w for _, w in d["attention"]] == pytest.approx(weights[0].tolist(), abs=1e-5)
    assert cls.score(labels) == json.loads(cli("eval", str(tmp_path / "cls" / "best.pt"), "--data", str(labels),
                                               "--json"))
    tagger = rnnkit.load(tmp_path / "tag" / "best.pt")
    printed = cli("predict", str(tmp_path / "tag" / "best.pt"), stdin=stdin)
    assert "".join(" ".join(t) + "\n" for t in tagger.predict(lines)) == printed
    tagger.task.model.eval()
    for line, tags_out in zip(lines, tagger.predict(lines)):    # a softmax tagger: each word's argmax
        if not line:
            continue
        batch = tagger.task.collate([tagger.task.encode(line.split())])
        with torch.no_grad():
            scores = tagger.task.model(batch["words"], batch["lengths"], batch["chars"])
        assert tags_out == [tagger.task.tags[int(i)] for i in scores[0].argmax(-1)]
    assert tagger.score(tags) == json.loads(cli("eval", str(tmp_path / "tag" / "best.pt"), "--data", str(tags),
                                                "--json"))
    with pytest.raises(DataError, match="file not found"):
        tagger.score(tmp_path / "missing.txt")


def test_forecaster_matches_the_command(tmp_path):
    series = write_csv(tmp_path / "series.csv", seasonal_series(400))
    train_forecaster(tmp_path, series, train={"max_steps": 4, "eval_every": 4})
    ckpt = tmp_path / "run" / "best.pt"
    m = rnnkit.load(ckpt)
    rows = m.forecast(series, at=300)
    printed = list(csv.reader(io.StringIO(cli("predict", str(ckpt), "--data", str(series), "--at", "300"))))
    assert printed[0] == ["origin", "timestamp", "step", "column", "value", "truth"]
    assert len(rows) == len(printed) - 1
    for row, line in zip(rows, printed[1:]):
        assert [str(row["origin"]), str(row["timestamp"]), str(row["step"]), row["column"]] == line[:4]
        assert row["value"] == float(line[4]) and row["truth"] == float(line[5])
    assert all(r["truth"] is None for r in m.forecast(series))    # past the file's end
    with pytest.raises(ConfigError, match="--at"):
        m.forecast(series, at=3)
    # computed apart: the CSV read by hand, standardised with the checkpoint's scaler, the model
    # on the 48 rows before row 300, scaled back; truth is the file's own rows 300 onwards
    task = m.task
    with open(series, newline="") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    values = np.array([[float(r[header.index(c)]) for c in task.columns] for r in body])
    mean, std = task.scaler.mean, task.scaler.std
    window = torch.tensor((values[300 - task.cfg.data.input_length:300] - mean) / std, dtype=torch.float32)
    task.model.eval()
    with torch.no_grad():
        forecast = task.model(window[None])[0].double().numpy()
    expected = forecast * std[task.targets] + mean[task.targets]
    by_step = {(r["step"], r["column"]): r for r in rows}
    for k in range(task.cfg.data.horizon):
        for j, column in enumerate(task.target_names):
            assert by_step[(k + 1, column)]["value"] == pytest.approx(expected[k, j], rel=1e-5, abs=1e-6)
            assert by_step[(k + 1, column)]["truth"] == pytest.approx(values[300 + k, task.targets[j]])


def test_load_errors_are_the_one_line_family(tmp_path, lm_checkpoint):
    from rnnkit.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        rnnkit.load(tmp_path / "nothing.pt")
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        rnnkit.load(lm_checkpoint, precision="fp16")
    assert rnnkit.load(lm_checkpoint).card()["task"] == "lm"
