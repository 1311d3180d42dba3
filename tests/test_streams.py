"""Live streams: a language model fed text as it arrives and a forecaster fed rows as they
arrive, the state kept between feeds (``rnnkit.decoding.streams``, ``Model.streams()``,
``rnnkit serve``'s ``/v1/{model}/streams``): the same answers as reading the whole, streams
stepped together without seeing each other, and every bad feed a 4xx that changes nothing."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

import rnnkit
from rnnkit.decoding.streams import FeedError
from rnnkit.serve import Limits, ModelProcess, build_app
from tests.conftest import SAMPLE_TEXT, tiny_lm_config, write_yaml
from tests.test_forecast import seasonal_series, write_csv
from tests.test_forecast import train as train_forecaster
from tests.test_serve import _cli

TEXT = SAMPLE_TEXT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A character LM and a forecaster, each trained a few steps, and their exports."""
    root = tmp_path_factory.mktemp("streams")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNKIT_CACHE", str(root / "cache"))
        _cli("train", str(write_yaml(root / "lm.yaml", tiny_lm_config(
            root / "lm", model={"num_layers": 2}, train={"max_steps": 10, "eval_every": 10}))))
        series = write_csv(root / "series.csv", seasonal_series(200))
        (root / "fc").mkdir()
        train_forecaster(root / "fc", series, train={"max_steps": 4, "eval_every": 4})
    paths = {"lm": root / "lm" / "run" / "best.pt", "fc": root / "fc" / "run" / "best.pt", "series": series}
    for name in ("lm", "fc"):
        _cli("export", str(paths[name]), "-o", str(root / f"{name}_onnx"))
        paths[f"{name}_onnx"] = root / f"{name}_onnx"
    return paths


def _whole(model, text: str) -> np.ndarray:
    """Each position's next-token log-probabilities of ``text`` read in one pass (T, V)."""
    ids = model.task.encode_piece(text)
    with model.running():
        log_probs, _ = model.task.step(np.asarray([ids]), None)
    return log_probs[0].astype(np.float64)


def _distribution(answer: dict, vocab: list[str]) -> np.ndarray:
    p = dict((token, prob) for token, prob in answer["top"])
    return np.asarray([p[t] for t in vocab])


@pytest.mark.parametrize("backend", ["checkpoint", "export"])
def test_streams_fed_in_pieces_from_many_clients_answer_as_their_whole_texts(trained, backend):
    """Eight texts, each fed in pieces by a client of its own, all at once: every answer is the
    next-token distribution of that text's prefix read whole, and feeds were stepped together."""
    m = rnnkit.load(trained["lm" if backend == "checkpoint" else "lm_onnx"])
    vocab = m.task.vocab.itos
    texts = [TEXT[400 * i: 400 * i + 60] for i in range(8)]          # distinct texts
    cuts = [0, 5, 6, 17, 30, 31, 45, 60]
    calls = []
    step = m.task.step
    m.task.step = lambda ids, state: (calls.append(ids.shape), step(ids, state))[1]
    with TestClient(build_app({"lm": m}, Limits(max_wait_ms=20))) as client:
        start = threading.Barrier(len(texts))

        def follow(text: str) -> list[tuple[int, dict]]:
            sid = client.post("/v1/lm/streams", json={}).json()["id"]
            start.wait()
            answers = []
            for a, b in zip(cuts, cuts[1:]):
                r = client.post(f"/v1/lm/streams/{sid}", json={"text": text[a:b], "top_k": len(vocab)})
                assert r.status_code == 200, r.text
                answers.append((b, r.json()))
            assert client.delete(f"/v1/lm/streams/{sid}").status_code == 200
            return answers

        with ThreadPoolExecutor(len(texts)) as pool:
            followed = list(pool.map(follow, texts))
        assert client.get("/health").json()["streams"] == {"lm": 0}
    for text, answers in zip(texts, followed):
        whole = np.exp(_whole(m, text))
        for end, answer in answers:
            assert answer["position"] == end
            assert np.abs(_distribution(answer, vocab) - whole[end - 1]).max() < 1e-5
    assert max(shape[0] for shape in calls) > 1         # some feeds were one batch of several streams


def test_streams_fed_at_once_are_one_step_each_as_alone_and_a_reused_row_starts_fresh(trained):
    m = rnnkit.load(trained["lm"])
    calls = []
    step = m.task.step
    m.task.step = lambda ids, state: (calls.append(ids.shape), step(ids, state))[1]
    book = m.streams()
    texts = {f"s{i}": TEXT[100 * i: 100 * i + 20] for i in range(5)}
    for sid, text in texts.items():
        book.open(sid, text[:10])
    calls.clear()
    together = book.feed([(sid, text[10:], {"top_k": 3}) for sid, text in texts.items()])
    assert calls == [(5, 10)]                             # five streams, ten tokens each: one call
    for sid, text in texts.items():
        alone = m.streams()
        alone.open("x", text[:10])
        [want] = alone.feed([("x", text[10:], {"top_k": 3})])
        got = together[list(texts).index(sid)]
        assert [t for t, _ in got["top"]] == [t for t, _ in want["top"]]
        assert np.allclose([p for _, p in got["top"]], [p for _, p in want["top"]], atol=1e-6)
    # a stream opened into a row another closed starts from an empty state, not the old one's
    book.close("s2")
    book.open("new", "a")
    [again] = book.feed([("new", "nd so", {"top_k": len(m.task.vocab)})])
    assert np.abs(_distribution(again, m.task.vocab.itos) - np.exp(_whole(m, "and so")[-1])).max() < 1e-5


def test_a_continuation_moves_the_state_only_when_asked(trained):
    m = rnnkit.load(trained["lm"])
    book = m.streams()
    V = len(m.task.vocab)
    book.open("keep", "The harbour")
    [sampled] = book.feed([("keep", " was", {"continuation": 12, "seed": 3, "top_k": 0})])
    text = sampled["continuation"]["text"]
    assert len(sampled["continuation"]["tokens"]) == 12 and sampled["position"] == len("The harbour was")
    [after] = book.feed([("keep", " x", {"top_k": V})])          # the state did not move over the sample
    assert np.abs(_distribution(after, m.task.vocab.itos) - np.exp(_whole(m, "The harbour was x")[-1])).max() < 1e-5
    book.open("move", "The harbour")
    [moved] = book.feed([("move", " was", {"continuation": 12, "seed": 3, "advance": True, "top_k": V})])
    assert moved["continuation"]["text"] == text and moved["position"] == len("The harbour was") + 12
    whole = np.exp(_whole(m, "The harbour was" + text))
    assert np.abs(_distribution(moved, m.task.vocab.itos) - whole[-1]).max() < 1e-5


@pytest.mark.parametrize("backend", ["checkpoint", "export"])
def test_a_forecaster_stream_fed_row_by_row_forecasts_what_predict_does_at_that_row(trained, backend):
    m = rnnkit.load(trained["fc" if backend == "checkpoint" else "fc_onnx"])
    series = trained["series"]
    lines = series.read_text().splitlines()
    columns = lines[0].split(",")[1:]
    rows = [[float(v) for v in line.split(",")[1:]] for line in lines[1:]]
    length, horizon = m.task.cfg.data.input_length, m.task.cfg.data.horizon
    live = m.incremental()
    for n, row in enumerate(rows[:length + 3], start=1):
        answer = live.feed([row] if n % 2 else [dict(zip(columns, row))])     # lists or objects by column
        if n < length:
            assert answer["forecast"] is None and answer["needs_rows"] == length - n
            continue
        want = m.forecast(series, at=n)
        got = np.asarray(answer["forecast"])
        assert got.shape == (horizon, len(m.task.target_names))
        expected = np.asarray([[r["value"] for r in want if r["step"] == k + 1] for k in range(horizon)])
        assert np.abs(got - expected).max() < 1e-6 * max(1.0, np.abs(expected).max())
    # a bad feed is refused whole and changes nothing
    for bad in ([[1.0]], [{"load": 1.0}], [[float("nan")] * len(columns)], [], [["a"] * len(columns)]):
        with pytest.raises(FeedError):
            live.feed(bad)
    assert live.position == length + 3


class _NoStreams:
    """A loaded model of a task without streams, as the server sees it."""

    def __init__(self, kind: str):
        self.kind, self.path = kind, "x"

    def card(self) -> dict:
        return {"task": self.kind}


@pytest.mark.parametrize("kind,why", [("translation", "whole source sentence"),
                                      ("classification", "bidirectional"), ("tagging", "bidirectional")])
def test_models_without_streams_refuse_them_in_one_line(kind, why):
    with TestClient(build_app({"m": _NoStreams(kind)})) as client:
        r = client.post("/v1/m/streams", json={"text": "a"})
    assert r.status_code == 400 and why in r.json()["error"] and "\n" not in r.json()["error"]


def test_bad_feeds_get_4xx_change_nothing_and_nothing_leaks(trained):
    m = rnnkit.load(trained["lm"])
    V = len(m.task.vocab)
    with TestClient(build_app({"lm": m}, Limits(max_streams=100, stream_idle_seconds=2.0, max_length=50))) as c:
        sid = c.post("/v1/lm/streams", json={"text": "The har"}).json()["id"]
        bad = [({"text": 5}, 422), ({"text": "a", "ids": [1]}, 422), ({"rows": [[1.0]]}, 422), ({}, 422),
               ({"ids": [V + 5]}, 422), ({"ids": ["a"]}, 422), ({"text": ""}, 422), ({"text": "a", "top_k": -1}, 422),
               ({"text": "a", "colour": 1}, 422), ({"text": "a", "continuation": 51}, 413),
               ({"ids": [1] * 51}, 413), ({"text": "a" * 100_000}, 413)]
        for body, status in bad:
            r = c.post(f"/v1/lm/streams/{sid}", json=body)
            assert r.status_code == status, (body, r.text)
            assert "\n" not in r.json()["error"]
        r = c.post(f"/v1/lm/streams/{sid}", content=b'{"text": "\xff\xfe"}', headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500
        r = c.post(f"/v1/lm/streams/{sid}", json={"text": "bour", "top_k": V})     # the state is as it was
        assert np.abs(_distribution(r.json(), m.task.vocab.itos) - np.exp(_whole(m, "The harbour")[-1])).max() < 1e-5
        assert c.get(f"/v1/lm/streams/{sid}").json()["position"] == len("The harbour")
        assert c.post("/v1/lm/streams/nobody", json={"text": "a"}).status_code == 404
        assert c.delete(f"/v1/lm/streams/{sid}").status_code == 200
        for method in ("post", "get", "delete"):                       # closed: 404 everywhere
            r = getattr(c, method)(f"/v1/lm/streams/{sid}", **({"json": {"text": "a"}} if method == "post" else {}))
            assert r.status_code == 404 and "closed, expired" in r.json()["error"]
        statuses = [c.post("/v1/lm/streams", json={"text": "a"}) for _ in range(150)]
        assert [r.status_code for r in statuses].count(200) == 100
        full = [r for r in statuses if r.status_code == 429]
        assert len(full) == 50 and full[0].headers["retry-after"] == "1"
        assert c.get("/health").json()["streams"] == {"lm": 100}
        kept = statuses[0].json()["id"]
        time.sleep(3.0)                                                 # idle past 2 s: all expire
        assert c.get("/health").json()["streams"] == {"lm": 0}
        assert c.post(f"/v1/lm/streams/{kept}", json={"text": "a"}).status_code == 404
        assert c.post("/v1/lm/streams", json={"text": "a"}).status_code == 200     # room again
    assert m._book is not None and len(m._book.streams) == 1 and m._book.rows.capacity <= 64


def test_streams_in_the_model_process_answer_as_in_process(trained):
    worker = ModelProcess({"lm": str(trained["lm"]), "fc": str(trained["fc"])})
    try:
        with TestClient(build_app(worker.models)) as c:
            sid = c.post("/v1/lm/streams", json={"text": "The har", "top_k": 4}).json()["id"]
            got = c.post(f"/v1/lm/streams/{sid}", json={"text": "bour", "top_k": 4}).json()
            r = c.post(f"/v1/lm/streams/{sid}", json={"ids": [10 ** 6]})
            assert r.status_code == 422 and "outside the vocabulary" in r.json()["error"]
            r = c.post("/v1/fc/streams", json={"rows": [[1.0, 2.0]], "top_k": 3})
            assert r.status_code == 422 and "language-model" in r.json()["error"]
            r = c.post("/v1/fc/streams", json={"rows": [[1.0, 2.0]] * 3})
            assert r.status_code == 200 and r.json()["needs_rows"] > 0
    finally:
        worker.close()
    m = rnnkit.load(trained["lm"])
    book = m.streams()
    book.open("a", "The har")
    [want] = book.feed([("a", "bour", {"top_k": 4})])
    assert [t for t, _ in got["top"]] == [t for t, _ in want["top"]] and got["position"] == want["position"]
    assert np.allclose([p for _, p in got["top"]], [p for _, p in want["top"]], atol=1e-6)
