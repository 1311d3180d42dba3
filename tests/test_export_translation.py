"""Translation models exported to ONNX: the encoder and decoder-step graphs against the
checkpoint, searched by the same numpy beam search; subword models; int8; no torch."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli import app
from rnnkit.training.checkpoint import CheckpointError
from tests.conftest import run_without_torch, write_yaml
from tests.test_translation_task import SAMPLE, translation_config

runner = CliRunner()
LINES = (SAMPLE / "valid.en").read_text(encoding="utf-8").splitlines()[:40]
REFS = (SAMPLE / "valid.fr").read_text(encoding="utf-8").splitlines()[:40]
MODELS = {   # what each exercises: input feeding into an LSTM; no attention; subwords, 2 layers, additive; heads;
    #            scan cells (a bidirectional minLSTM encoder, an input-fed minGRU decoder); xLSTM's cells
    #            (a bidirectional sLSTM encoder, an input-fed mLSTM decoder)
    "lstm": ({"cell": "lstm", "bidirectional": True}, {"cell": "lstm", "attention": "general", "input_feeding": True},
             {}),
    "none": ({"cell": "gru"}, {"cell": "gru", "attention": "none", "input_feeding": False}, {}),
    "bpe": ({"cell": "lstm", "num_layers": 2}, {"cell": "gru", "num_layers": 2, "attention": "additive",
                                                "input_feeding": False},
            {"src_tokenizer": "bpe", "tgt_tokenizer": "bpe", "src_vocab_size": 120, "tgt_vocab_size": 120}),
    "heads": ({"cell": "lstm"}, {"cell": "lstm", "attention": "additive", "attention_heads": 4}, {}),
    "scan": ({"cell": "minlstm", "bidirectional": True}, {"cell": "mingru", "attention": "general",
                                                          "input_feeding": True}, {}),
    "xlstm": ({"cell": "slstm", "bidirectional": True, "cell_heads": 2},
              {"cell": "mlstm", "attention": "general", "input_feeding": True, "cell_heads": 2}, {}),
}


def _cli(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each kind of model trained a few steps (enough to make its choices differ from
    uniform) and exported: {name: (checkpoint, export folder)}."""
    tmp = tmp_path_factory.mktemp("mt")
    out = {}
    for name, (enc, dec, data) in MODELS.items():
        cfg = translation_config(tmp / name, data=data, train={"max_steps": 30, "eval_every": 30})
        cfg["model"]["encoder"].update(enc)
        cfg["model"]["decoder"].update(dec)
        _cli("train", str(write_yaml(tmp / f"{name}.yaml", cfg)))
        ckpt = tmp / name / "run" / "best.pt"
        _cli("export", str(ckpt), "-o", str(tmp / f"{name}_onnx"))
        out[name] = (ckpt, tmp / f"{name}_onnx")
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_an_exported_translator_translates_what_the_checkpoint_does(models, name):
    ckpt, folder = models[name]
    torch_model, onnx_model = rnnkit.load(ckpt), rnnkit.load(folder)
    assert onnx_model.backend == "onnxruntime" and type(onnx_model) is type(torch_model)
    for beam, n_best in ((1, 1), (4, 2)):
        a = torch_model.translations(LINES, beam=beam, n_best=n_best, batch_size=16)
        b = onnx_model.translations(LINES, beam=beam, n_best=n_best, batch_size=16)
        flat = lambda r: [h for hyps in r for h in (hyps if n_best > 1 else [hyps])]  # noqa: E731
        for x, y in zip(flat(a), flat(b)):
            assert x.text == y.text and x.tgt_tokens == y.tgt_tokens
            assert x.score == pytest.approx(y.score, abs=1e-4)
            if x.attention is None:
                assert y.attention is None
            else:
                assert isinstance(y.attention, np.ndarray) and y.attention.shape == x.attention.shape
                assert np.allclose(x.attention, y.attention, atol=1e-5)
                assert (x.heads is None) == (y.heads is None) == (name != "heads")
                if x.heads is not None:
                    assert x.heads.shape == (4, *x.attention.shape) and np.allclose(x.heads, y.heads, atol=1e-5)
    assert len({round(t.score, 3) for t in torch_model.translations(LINES)}) > 10   # each source counts
    mine, theirs = torch_model.score(LINES, REFS), onnx_model.score(LINES, REFS)
    assert mine["bleu"] == theirs["bleu"] and mine["chrf"] == theirs["chrf"]
    assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)   # teacher-forced, through the step graph


def test_the_export_decodes_sources_longer_than_the_examples(models):
    """The graphs were traced with 5-token sources and a batch of 2; both axes are dynamic."""
    ckpt, folder = models["lstm"]
    long = [" ".join(LINES[:3])] * 3 + ["a"]
    assert rnnkit.load(folder).translate(long, beam=3) == rnnkit.load(ckpt).translate(long, beam=3)


def test_replace_unk_and_a_stream_on_an_export(models):
    ckpt, folder = models["lstm"]
    a, b = rnnkit.load(ckpt), rnnkit.load(folder)
    line = "the zorblax quintessentially glimmered"
    assert b.translate([line], replace_unk=True) == a.translate([line], replace_unk=True)
    expected = b.translate(LINES, beam=3)
    stream, found, waiting = b.stream(beam=3, capacity=5), {}, list(enumerate(LINES))
    while waiting or stream.live:            # sentences join as others leave
        take, waiting = waiting[:min(stream.room, 2)], waiting[min(stream.room, 2):]
        for tag, result in stream.add([x for _, x in take], [i for i, _ in take]) + stream.step():
            found[tag] = result.text
    assert [found[i] for i in range(len(LINES))] == expected


def test_subword_models_carry_their_sentencepiece_files(models, tmp_path):
    folder = models["bpe"][1]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["extras"]["src"]["model"] == {"$file": "src.model"}
    assert (folder / "src.model").stat().st_size > 1000 and (folder / "tgt.model").is_file()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        if f.name != "tgt.model":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="tgt.model is missing"):
        rnnkit.load(broken)


def test_int8_translation_export_is_smaller_and_close(models, tmp_path):
    ckpt, fp32 = models["lstm"]
    result = runner.invoke(app, ["export", str(ckpt), "-o", str(tmp_path / "q"), "--int8"])
    assert result.exit_code == 0, result.output
    step = lambda d: sum(f.stat().st_size for f in d.glob("decoder_step.*"))  # noqa: E731  (the encoder: mostly graph)
    assert step(tmp_path / "q") < 0.6 * step(fp32)
    from tests.test_export import int8_ops

    ops = int8_ops(tmp_path / "q" / "decoder_step.onnx")
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops and "fp32 weight product" not in ops, sorted(ops)
    assert "DynamicQuantizeLSTM" in int8_ops(tmp_path / "q" / "encoder.onnx")
    q, f = rnnkit.load(tmp_path / "q").translate(LINES), rnnkit.load(fp32).translate(LINES)
    assert sum(a == b for a, b in zip(q, f)) >= 0.8 * len(LINES)


def test_translate_and_serve_an_export_without_torch(models, tmp_path):
    """rnnkit.load(DIR).translate, rnnkit translate DIR and eval DIR where importing torch fails."""
    folder = models["bpe"][1]
    src, ref = tmp_path / "in.en", tmp_path / "ref.fr"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    lines = run_without_torch(f"print(json.dumps(rnnkit.load({str(folder)!r}).translate({LINES[:5]!r}, beam=3)))",
                              [["translate", str(folder), "--input", str(src), "--beam", "3", "--output",
                                str(tmp_path / "out.fr")],
                               ["eval", str(folder), "--src", str(src), "--ref", str(ref), "--json"]])
    assert json.loads(lines[0]) == rnnkit.load(models["bpe"][0]).translate(LINES[:5], beam=3)
    assert lines[-1] == "torch imported: False"
    assert json.loads(lines[-2])["bleu"] == rnnkit.load(folder).score(LINES, REFS)["bleu"]
    assert (tmp_path / "out.fr").read_text(encoding="utf-8").splitlines() == rnnkit.load(folder).translate(LINES, beam=3)

    from fastapi.testclient import TestClient

    from rnnkit.serve import build_app

    m = rnnkit.load(models["lstm"][1])
    with TestClient(build_app({"mt": m})) as client:
        r = client.post("/v1/mt/translate", json={"lines": LINES[:6], "beam": 3, "attention": True})
        assert r.status_code == 200
        got = r.json()["translations"]
        assert [t["text"] for t in got] == m.translate(LINES[:6], beam=3)
        assert all(abs(sum(row) - 1) < 1e-3 for t in got for row in t["attention"]["weights"])


def test_weights_live_beside_the_graphs(models, tmp_path, monkeypatch):
    """Each graph's weights are a file of their own (mapped, not copied, when loaded); a missing
    one is a one-line error. Sessions sleep between runs and pack weights only when asked."""
    from rnnkit.runtime.manifest import PREPACK_VARIABLE, open_graph, read_manifest

    folder = models["lstm"][1]
    spec = read_manifest(folder)["graphs"]["step"]
    assert spec["weights"] == "decoder_step.weights"
    assert (folder / "decoder_step.weights").stat().st_size > 10 * (folder / "decoder_step.onnx").stat().st_size
    monkeypatch.delenv(PREPACK_VARIABLE, raising=False)
    options = open_graph(folder, spec).get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv(PREPACK_VARIABLE, "1")
    with pytest.raises(RuntimeError):         # not set: onnxruntime's default, packed weights
        open_graph(folder, spec).get_session_options().get_session_config_entry("session.disable_prepacking")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        if f.name != "encoder.weights":
            (broken / f.name).write_bytes(f.read_bytes())
    result = runner.invoke(app, ["translate", str(broken), "--input", str(SAMPLE / "valid.en")])
    assert result.exit_code == 2 and "encoder.weights) is missing" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_runtime_reorders_every_state_array_when_the_rows_stay_as_many(models):
    """Beam search reorders rows at every step, often to as many rows as before: the LSTM's
    cell state must move with its hidden state then too (a decode whose reorders were all
    the identity would not notice if it did not)."""
    m = rnnkit.load(models["lstm"][1])
    ids = [m.task.src_tok.encode(s) for s in ("a man is riding a bike", "two dogs", "the red car is fast")]
    state, _ = m.task.encode_ids(ids)
    steps = m.task.search_backend()
    _, _, _, state = steps.step(np.full(3, m.task.bos, np.int64), steps.select(state, np.arange(3)), 2)
    assert {"h", "c"} <= set(state), sorted(state)
    order = np.asarray([2, 0, 1])
    moved = steps.select(state, order)
    for name, array in state.items():
        axis = steps.axes[name]
        assert np.array_equal(moved[name], np.take(array, order, axis=axis)), name
        assert not np.array_equal(moved[name], array), name      # the rows really differ
