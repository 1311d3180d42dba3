"""``rnnkit export``: language models as ONNX graphs run by onnxruntime without torch, giving
what the checkpoint gives; incremental feeding; every bad input a line and nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli import app
from rnnkit.training.checkpoint import CheckpointError
from tests.conftest import SAMPLE_TEXT, run_without_torch, tiny_lm_config, write_yaml

runner = CliRunner()
TEXT = SAMPLE_TEXT.read_text(encoding="utf-8")[:3000]


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A character LSTM LM, a word GRU LM with an adaptive softmax, character LMs of RG-LRUs in Hawk's block, of
    mLSTMs, and of xLSTM's mLSTM and sLSTM blocks, each trained a few steps and exported."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for name, sections in (("char", {"model": {"cell": "lstm", "num_layers": 2}}),
                           ("word", {"data": {"tokenizer": "word", "bptt": 8},
                                     "model": {"cell": "gru", "output": "adaptive", "cutoffs": [20, 60]}}),
                           ("scan", {"model": {"cell": "rglru", "num_layers": 2, "block": True}}),
                           ("mlstm", {"model": {"cell": "mlstm", "num_layers": 2, "cell_heads": 2}}),
                           ("mlstm_block", {"model": {"cell": "mlstm", "block": True, "cell_heads": 2}}),
                           ("slstm_block", {"model": {"cell": "slstm", "block": True, "cell_heads": 2}})):
        cfg = tiny_lm_config(tmp, run_dir=str(tmp / name), **sections)
        cfg["train"].update(max_steps=12, eval_every=12)
        _cli("train", str(write_yaml(tmp / f"{name}.yaml", cfg)))
        _cli("export", str(tmp / name / "best.pt"), "-o", str(tmp / f"{name}_onnx"))
        out[name] = (tmp / name / "best.pt", tmp / f"{name}_onnx")
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A BiLSTM classifier with attention pooling, trained a few steps and exported."""
    from tests.test_api import _labelled_files

    tmp = tmp_path_factory.mktemp("classifier")
    labels, _ = _labelled_files(tmp)
    cfg = {"task": "classification", "run_dir": str(tmp / "cls"), "data": {"train": str(labels), "valid": str(labels)},
           "model": {"embedding_dim": 8, "hidden_size": 8, "num_layers": 2, "pooling": "attention"},
           "train": {"max_steps": 6, "eval_every": 6, "batch_size": 4}}
    _cli("train", str(write_yaml(tmp / "cls.yaml", cfg)))
    _cli("export", str(tmp / "cls" / "best.pt"), "-o", str(tmp / "cls_onnx"))
    return tmp / "cls" / "best.pt", tmp / "cls_onnx", labels


def test_an_exported_classifier_predicts_what_the_checkpoint_does(classifier):
    ckpt, folder, labels = classifier
    a, b = rnnkit.load(ckpt), rnnkit.load(folder)
    assert type(a) is type(b) and b.backend == "onnxruntime"
    lines = ["calm grey water", "", "bright day", "unseen words here and more words than in training", "wind"]
    for x, y in zip(a.predict(lines, batch_size=2), b.predict(lines, batch_size=2)):
        if x is None:
            assert y is None
            continue
        assert x["label"] == y["label"]
        assert list(x["probabilities"].values()) == pytest.approx(list(y["probabilities"].values()), abs=1e-5)
        assert [w for _, w in x["attention"]] == pytest.approx([w for _, w in y["attention"]], abs=1e-5)
    got, want = b.score(labels), a.score(labels)
    assert got["accuracy"] == want["accuracy"] and got["confusion"] == want["confusion"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert _cli("predict", str(folder), "--probs", "--attention") == _cli("predict", str(ckpt), "--probs",
                                                                             "--attention")


@pytest.mark.parametrize("output,cell", [("softmax", "lstm"), ("crf", "lstm")])
def test_an_exported_tagger_tags_what_the_checkpoint_does(tmp_path, output, cell):
    from tests.test_api import _labelled_files

    _, tags = _labelled_files(tmp_path)
    cfg = {"task": "tagging", "run_dir": str(tmp_path / "tag"),
           "data": {"format": "columns", "train": str(tags), "valid": str(tags), "token_column": 1, "tag_column": 2},
           "model": {"cell": cell, "embedding_dim": 8, "hidden_size": 8, "num_layers": 1, "output": output,
                     "char_embedding_dim": 4, "char_hidden_size": 4},
           "train": {"max_steps": 8, "eval_every": 8, "batch_size": 4}}
    _cli("train", str(write_yaml(tmp_path / "tag.yaml", cfg)))
    _cli("export", str(tmp_path / "tag" / "best.pt"), "-o", str(tmp_path / "tag_onnx"))
    a, b = rnnkit.load(tmp_path / "tag" / "best.pt"), rnnkit.load(tmp_path / "tag_onnx")
    assert type(a) is type(b) and b.backend == "onnxruntime"
    lines = ["calm water", "", "grey wind bright day calm water grey", "Unseen-Words here"]
    assert b.predict(lines, batch_size=2) == a.predict(lines, batch_size=2)
    got, want = b.score(tags), a.score(tags)
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    if output == "crf":
        assert "crf" in json.loads((tmp_path / "tag_onnx" / "manifest.json").read_text())["graphs"]["tag"]


def test_viterbi_and_the_crf_loss_match_the_torch_crf():
    import torch

    from rnnkit.models.crf import CRF
    from rnnkit.tasks.tagger_text import crf_nll, viterbi

    torch.manual_seed(0)
    crf = CRF(5)
    emissions = torch.randn(3, 7, 5)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    params = [getattr(crf, k).detach().double().numpy() for k in ("transitions", "start", "end")]
    paths = crf.decode(emissions, mask)
    tags = torch.randint(0, 5, (3, 7))
    nll = crf.nll(emissions, tags, mask).detach()
    for b, n in enumerate(lengths):
        e = emissions[b, :n].double().numpy()
        assert viterbi(e, n, *params) == paths[b]
        assert crf_nll(e, tags[b, :n].tolist(), *params) == pytest.approx(float(nll[b]), rel=1e-5)


@pytest.mark.parametrize("name", ["char", "word", "scan", "mlstm", "mlstm_block", "slstm_block"])
def test_the_export_gives_the_checkpoints_log_probabilities(exported, name):
    ckpt, folder = exported[name]
    torch_model, onnx_model = rnnkit.load(ckpt), rnnkit.load(folder)
    assert type(onnx_model) is type(torch_model) and onnx_model.backend == "onnxruntime"
    rng = np.random.default_rng(0)
    for batch, length in ((3, 13), (1, 1), (2, 40)):     # other shapes than the export's example (2, 5)
        ids = rng.integers(0, len(torch_model.task.vocab), (batch, length))
        a, state_a = torch_model.task.step(ids, None)
        b, state_b = onnx_model.task.step(ids, None)
        assert np.abs(a - b).max() < 1e-4
        more = rng.integers(0, len(torch_model.task.vocab), (batch, 3))   # and continuing a state
        assert np.abs(torch_model.task.step(more, state_a)[0] - onnx_model.task.step(more, state_b)[0]).max() < 1e-4
    assert onnx_model.score(TEXT) == pytest.approx(torch_model.score(TEXT), rel=1e-5)
    # greedy generation is the same on both backends; sampling is reproducible on each
    assert onnx_model.generate("The", 40, top_k=1) == torch_model.generate("The", 40, top_k=1)
    assert onnx_model.generate("The", 40, seed=4) == onnx_model.generate("The", 40, seed=4)


@pytest.mark.parametrize("backend", ["checkpoint", "export"])
def test_feeding_text_in_pieces_gives_the_log_probabilities_of_the_whole(exported, backend):
    ckpt, folder = exported["char"]
    m = rnnkit.load(ckpt if backend == "checkpoint" else folder)
    text = TEXT[:400]
    whole = m.incremental()
    whole.feed(text)
    pieces = m.incremental()
    cuts = [0, 1, 7, 50, 51, 200, 400]
    for a, b in zip(cuts, cuts[1:]):
        probs = pieces.feed(text[a:b])
    assert len(pieces.log_probs) == len(text) - 1
    assert np.allclose(pieces.log_probs, whole.log_probs, atol=1e-5)
    # and they are the model's log-probabilities of the text scored in one pass
    ids = m.task.encode(text)
    scored, _ = m.task.step(np.asarray([ids]), None)
    expected = [scored[0, i, t] for i, t in enumerate(ids[1:])]
    assert np.allclose(pieces.log_probs, expected, atol=1e-4)
    assert probs.shape == (len(m.task.vocab),) and probs.sum() == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(probs, np.exp(scored[0, -1]), atol=1e-5)


def test_word_pieces_continue_the_line(exported):
    m = rnnkit.load(exported["word"][1])
    pieces = m.incremental()
    for piece in ("the lamp ", "was lit", " at dusk\nthe harbour"):
        pieces.feed(piece)
    whole = m.incremental()
    whole.feed("the lamp was lit at dusk\nthe harbour")
    assert pieces.tokens == whole.tokens and np.allclose(pieces.log_probs, whole.log_probs, atol=1e-6)


def test_an_export_runs_where_importing_torch_fails(exported, classifier, tmp_path):
    """rnnkit.load(DIR), rnnkit generate DIR, eval DIR and predict DIR in a process that cannot import torch."""
    folder = exported["char"][1]
    cls_folder, labels = classifier[1], classifier[2]
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    first = (f"m = rnnkit.load({str(folder)!r})\n"
             f"print(json.dumps({{'score': m.score(open({str(text)!r}).read()), 'text': m.generate('The', 20, seed=1)}}))")
    lines = run_without_torch(first, [["generate", str(folder), "--prime", "The", "--length", "10", "--seed", "2"],
                                      ["eval", str(cls_folder), "--data", str(labels), "--json"],
                                      ["predict", str(cls_folder), "--input", str(text), "--probs"],
                                      ["eval", str(folder), "--data", str(text), "--json"]])
    first = json.loads(lines[0])
    assert first["score"]["ppl"] > 1 and len(first["text"]) == 20
    assert lines[-1] == "torch imported: False"
    assert json.loads(lines[-2])["ppl"] == pytest.approx(first["score"]["ppl"])


def int8_ops(path: Path) -> set[str]:
    """The operator types of an exported graph (its weights left on disk), and "fp32 weight
    product" where a MatMul, Gemm or LSTM still reads a weight in float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {w.name for w in graph.initializer}
    ops = {n.op_type for n in graph.node}
    if any(n.op_type in ("MatMul", "Gemm", "LSTM") and weights & set(n.input) for n in graph.node):
        ops.add("fp32 weight product")
    return ops


def test_int8_export_is_smaller_and_close(exported, tmp_path):
    ckpt, fp32 = exported["char"]
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "q"), "--int8"])
    assert result.exit_code == 0, result.output
    assert "int8" in result.output
    size = lambda d: sum(f.stat().st_size for f in d.glob("lm_step.*"))  # noqa: E731  (the graph and its weights)
    assert size(tmp_path / "q") < 0.6 * size(fp32)
    assert int8_ops(tmp_path / "q" / "lm_step.onnx") >= {"DynamicQuantizeLSTM", "MatMulInteger", "DequantizeLinear"}
    assert "fp32 weight product" not in int8_ops(tmp_path / "q" / "lm_step.onnx")
    assert "fp32 weight product" in int8_ops(fp32 / "lm_step.onnx")
    q = rnnkit.load(tmp_path / "q")
    assert q.card()["int8"] is True
    assert q.score(TEXT)["loss"] == pytest.approx(rnnkit.load(fp32).score(TEXT)["loss"], abs=0.05)


def test_bad_exports_are_one_line_and_write_nothing(exported, tmp_path):
    ckpt, folder = exported["char"]
    # a folder that exists and holds something: refused, untouched
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "busy")])
    assert result.exit_code == 2 and "exists" in result.output
    assert os.listdir(tmp_path / "busy") == ["keep.txt"]
    # checkpoints that cannot be exported: one line naming why; nothing at DIR, no temporary left
    tmp = tmp_path / "cfgs"
    tmp.mkdir()
    for name, sections, why in (("explicit", {"model": {"impl": "explicit"}}, "explicit cells"),):
        cfg = tiny_lm_config(tmp, run_dir=str(tmp / name), **sections)
        cfg["train"].update(max_steps=2, eval_every=2)
        _cli("train", str(write_yaml(tmp / f"{name}.yaml", cfg)))
        result = runner.invoke(app, ["export", str(tmp / name / "best.pt"), "-o", str(tmp_path / f"out_{name}")])
        assert result.exit_code == 2 and why in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / f"out_{name}").exists()
    not_ckpt = tmp_path / "x.pt"
    not_ckpt.write_bytes(b"nothing")
    result = runner.invoke(app, ["export", str(not_ckpt), "-o", str(tmp_path / "out_x")])
    assert result.exit_code == 2 and "not a readable rnnkit checkpoint" in result.output
    # an unreadable checkpoint makes none of the missing folders above DIR
    result = runner.invoke(app, ["export", str(not_ckpt), "-o", str(tmp_path / "new" / "out_x")])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()
    # a file where a folder above DIR should be: one line
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "x.pt" / "out")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "cfgs", "data-cache", "x.pt"]  # no temporaries


def test_an_export_makes_the_folders_above_it(exported, tmp_path):
    ckpt, _ = exported["char"]
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "exports" / "lm" / "char")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exports" / "lm" / "char" / "manifest.json").is_file()
    assert os.listdir(tmp_path / "exports" / "lm") == ["char"]      # no temporary left beside it


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_damaged_exports_are_one_line(exported, tmp_path):
    folder = exported["char"][1]
    missing = _copy(folder, tmp_path / "missing")
    (missing / "lm_step.onnx").unlink()
    damaged = _copy(folder, tmp_path / "damaged")
    (damaged / "lm_step.onnx").write_bytes(b"\x08\x01garbage")
    future = _copy(folder, tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format": "rnnkit-export-9"}))
    mismatched = _copy(folder, tmp_path / "mismatched")
    manifest["graphs"]["step"]["inputs"] = ["tokens", "hidden"]
    (mismatched / "manifest.json").write_text(json.dumps(manifest))
    for path, words in ((missing, "is missing"), (damaged, "not a readable ONNX graph"),
                        (future, "format version '9'"), (mismatched, "does not match its manifest"),
                        (tmp_path, "not an rnnkit export")):
        with pytest.raises(CheckpointError, match=words):
            rnnkit.load(path)
        result = runner.invoke(app, ["generate", str(path), "--length", "3"])
        assert result.exit_code == 2 and words in result.output and len(result.output.strip().splitlines()) == 1


def test_options_that_an_export_fixed_are_refused(exported):
    folder = exported["char"][1]
    for args in (["--precision", "bf16"], ["--int8"], ["--device", "cpu"]):
        result = runner.invoke(app, ["generate", str(folder), "--length", "3", *args])
        assert result.exit_code == 2 and "apply to checkpoints" in result.output
    result = runner.invoke(app, ["eval", str(folder), "--gradient-flow"])
    assert result.exit_code == 2 and "--gradient-flow needs the checkpoint" in result.output
    assert rnnkit.load(folder).card()["backend"] == "onnxruntime"


def test_serve_answers_from_an_export(exported, classifier):
    from fastapi.testclient import TestClient

    from rnnkit.serve import build_app

    lm, cls = rnnkit.load(exported["char"][1]), rnnkit.load(classifier[1])
    with TestClient(build_app({"lm": lm, "cls": cls})) as client:
        r = client.post("/v1/lm/generate", json={"prime": "The", "length": 15, "seed": 3})
        assert r.status_code == 200 and r.json()["text"] == lm.generate("The", 15, seed=3)
        r = client.post("/v1/cls/predict", json={"lines": ["calm grey water"]})
        expected = cls.predict(["calm grey water"])[0]["label"]
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == expected
        cards = {c["name"]: c for c in client.get("/v1/models").json()["models"]}
        assert cards["lm"]["backend"] == "onnxruntime"


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_tasks_without_an_export_yet_say_so(task):
    from types import SimpleNamespace

    from rnnkit.export.writer import exportable

    with pytest.raises(CheckpointError, match=f"a '{task}' checkpoint cannot be exported yet; rnnkit exports lm, "
                                              f"translation, tagging, classification, forecast models so far"):
        exportable(SimpleNamespace(task=task, model=SimpleNamespace(impl="fused")))


@pytest.mark.parametrize("decoder,cell", [("direct", "gru"), ("recurrent", "mingru"), ("recurrent", "slstm")])
def test_an_exported_forecaster_forecasts_what_the_checkpoint_does(tmp_path, decoder, cell):
    from tests.test_forecast import forecast_config, seasonal_series, write_csv

    series = write_csv(tmp_path / "series.csv", seasonal_series(400))
    cfg = forecast_config(tmp_path, series, model={"decoder": decoder, "cell": cell})
    cfg["train"].update(max_steps=4, eval_every=4)
    _cli("train", str(write_yaml(tmp_path / "f.yaml", cfg)))
    _cli("export", str(tmp_path / "run" / "best.pt"), "-o", str(tmp_path / "f_onnx"))
    a, b = rnnkit.load(tmp_path / "run" / "best.pt"), rnnkit.load(tmp_path / "f_onnx")
    assert type(a) is type(b) and b.backend == "onnxruntime"
    for x, y in zip(a.forecast(series, at=300), b.forecast(series, at=300)):
        assert {k: v for k, v in x.items() if k != "value"} == {k: v for k, v in y.items() if k != "value"}
        assert x["value"] == pytest.approx(y["value"], rel=1e-4, abs=1e-4)
    got, want = b.score(series, split="test"), a.score(series, split="test")
    assert round(got["mse"], 4) == round(want["mse"], 4) and got["windows"] == want["windows"]
    assert got["seasonal_mse"] == pytest.approx(want["seasonal_mse"], rel=1e-9)


def test_info_shows_an_exports_card(exported):
    card = json.loads(_cli("info", str(exported["char"][1]), "--json"))
    assert card["backend"] == "onnxruntime" and card["int8"] is False and card["task"] == "lm"


def test_the_cache_scores_an_export_as_it_scores_the_checkpoint(exported):
    ckpt, folder = exported["word"]
    text = " ".join(TEXT.split()[:400]) + "\n"
    a = rnnkit.load(ckpt).score(text, streams=2, cache=50, cache_theta=0.5, cache_lambda=0.2)
    b = rnnkit.load(folder).score(text, streams=2, cache=50, cache_theta=0.5, cache_lambda=0.2)
    assert b["cache_ppl"] == pytest.approx(a["cache_ppl"], rel=1e-4) and b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
    assert b["cache_ppl"] != b["ppl"]
