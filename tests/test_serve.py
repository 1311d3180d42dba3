"""``rnnkit serve``: the server answers what the Python API answers, merges concurrent requests
without changing their answers, turns bad requests into 4xx JSON errors and drains on SIGTERM."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.encoders import jsonable_encoder
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli import app as cli_app
from rnnkit.serve import Batcher, Busy, Limits, build_app, model_names
from rnnkit.serve import ModelProcess
from tests.conftest import ROOT, tiny_lm_config, write_yaml
from tests.test_api import _labelled_files
from tests.test_forecast import seasonal_series, write_csv
from tests.test_forecast import train as train_forecaster
from tests.test_translation_task import train as train_translator

runner = CliRunner()
SENTENCES = ["the cat sees the dog", "a small bird sings", "the dog", "a man is riding a bike",
             "two people walk on the beach", "the red car", "children play in the park", "a dog runs"]


def _cli(*args: str) -> None:
    result = runner.invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RNNKIT_CACHE", str(root / "cache"))
        (root / "tr").mkdir()
        paths = {"en_fr": train_translator(root / "tr", model={"decoder": {
            "cell": "gru", "hidden_size": 32, "dropout": 0.0, "input_feeding": True, "attention": "general"}})}
        labels, tags = _labelled_files(root)
        small = {"embedding_dim": 8, "hidden_size": 8, "num_layers": 1}
        for name, cfg in {
            "sentiment": {"task": "classification", "data": {"train": str(labels), "valid": str(labels)},
                          "model": small},
            "pos": {"task": "tagging", "data": {"format": "columns", "train": str(tags), "valid": str(tags),
                                                "token_column": 1, "tag_column": 2}, "model": small},
        }.items():
            cfg.update(run_dir=str(root / name), train={"max_steps": 6, "eval_every": 6, "batch_size": 4})
            _cli("train", str(write_yaml(root / f"{name}.yaml", cfg)))
            paths[name] = root / name / "best.pt"
        (root / "lm").mkdir()
        _cli("train", str(write_yaml(root / "lm.yaml", tiny_lm_config(root / "lm", train={"max_steps": 6}))))
        paths["chars"] = root / "lm" / "run" / "best.pt"
        (root / "fc").mkdir()
        series = write_csv(root / "series.csv", seasonal_series(300))
        train_forecaster(root / "fc", series, train={"max_steps": 4, "eval_every": 4})
        paths["load"] = root / "fc" / "run" / "best.pt"
    paths["series"] = series
    return paths


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: rnnkit.load(path) for name, path in checkpoints.items() if name != "series"}


@pytest.fixture(scope="module", params=["in_process", "model_process"])
def client(request, models, checkpoints):
    """The app on the models loaded here, and on the same checkpoints in a model process of
    their own (what ``rnnkit serve`` runs): each test that uses it must hold for both."""
    worker = None
    if request.param == "model_process":
        worker = ModelProcess({n: str(p) for n, p in checkpoints.items() if n != "series"})
    try:
        served = worker.models if worker else models
        with TestClient(build_app(served, Limits(max_body=64 * 1024, max_tokens=200))) as c:
            yield c
    finally:
        if worker:
            worker.close()


def test_the_server_answers_what_the_api_answers(client, models, checkpoints):
    en_fr = models["en_fr"]
    r = client.post("/v1/en_fr/translate", json={"lines": SENTENCES, "beam": 1})
    assert r.status_code == 200
    assert [t["text"] for t in r.json()["translations"]] == en_fr.translate(SENTENCES, beam=1)
    r = client.post("/v1/en_fr/translate", json={"lines": SENTENCES, "beam": 3, "n_best": 2, "attention": True})
    body = r.json()["translations"]
    assert [[h["text"] for h in t["n_best"]] for t in body] == en_fr.translate(SENTENCES, beam=3, n_best=2)
    att = body[0]["attention"]
    assert att["source"] == SENTENCES[0].split() and len(att["weights"]) == len(att["target"])
    assert all(abs(sum(row) - 1) < 1e-2 for row in att["weights"])     # a distribution over the source

    lines = ["calm grey water", "", "bright day"]
    r = client.post("/v1/sentiment/predict", json={"lines": lines})
    assert r.json()["predictions"] == json.loads(json.dumps(models["sentiment"].predict(lines)))
    r = client.post("/v1/pos/predict", json={"lines": lines})
    assert [p["tags"] for p in r.json()["predictions"]] == models["pos"].predict(lines)
    assert r.json()["predictions"][0]["words"] == ["calm", "grey", "water"]

    r = client.post("/v1/chars/generate", json={"prime": "The", "length": 30, "seed": 5, "temperature": 0.8})
    assert r.json()["text"] == models["chars"].generate("The", 30, temperature=0.8, seed=5)

    csv_text = checkpoints["series"].read_text()
    r = client.post("/v1/load/forecast", json={"csv": csv_text, "at": 200})
    assert r.json()["forecasts"] == jsonable_encoder(models["load"].forecast(checkpoints["series"], at=200))

    cards = {c["name"]: c for c in client.get("/v1/models").json()["models"]}
    assert {n: c["task"] for n, c in cards.items()} == {
        "en_fr": "translation", "sentiment": "classification", "pos": "tagging", "chars": "lm", "load": "forecast"}
    assert cards["en_fr"]["attention"] is True and cards["en_fr"]["src_vocab_size"] > 4
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "/v1/models" in page.text
    assert "/v1/{model}/translate" in client.get("/openapi.json").json()["paths"]


def test_concurrent_requests_are_merged_and_answered_as_alone(models):
    """32 clients at once, one sentence each: fewer decodes than requests, and every answer the
    sentence's own translation decoded alone (this model and these sentences: no difference)."""
    en_fr = models["en_fr"]
    sentences = [SENTENCES[i % len(SENTENCES)] + " " + "the " * (i // len(SENTENCES)) for i in range(32)]
    alone = [en_fr.translate([s], beam=5)[0] for s in sentences]
    with TestClient(build_app({"en_fr": en_fr}, Limits(max_batch=32, max_wait_ms=300))) as c:
        start = threading.Barrier(32)

        def ask(s: str) -> str:
            start.wait()
            r = c.post("/v1/en_fr/translate", json={"lines": [s], "beam": 5})
            assert r.status_code == 200, r.text
            return r.json()["translations"][0]["text"]

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, sentences))
        card = c.get("/v1/models").json()["models"][0]
    assert answers == alone
    assert card["sentences_served"] == 32 and card["batches"] < 16


BAD_REQUESTS = [
    ("POST", "/v1/en_fr/translate", b"{not json", "application/json"),
    ("POST", "/v1/en_fr/translate", b"", "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": "a string"}', "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": [1, 2]}', "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": ["a"], "beam": "5"}', "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": ["a"], "beam": 0}', "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": ["a"], "beam": 2, "n_best": 3}', "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": ["a"], "colour": "red"}', "application/json"),
    ("POST", "/v1/en_fr/translate", b'[1, 2, 3]', "application/json"),
    ("POST", "/v1/en_fr/translate", json.dumps({"lines": [" ".join(["word"] * 10_000)]}).encode(), "application/json"),
    ("POST", "/v1/en_fr/translate", b'{"lines": ["\xff\xfe caf\xe9"]}', "application/json"),
    ("POST", "/v1/en_fr/translate", b"x" * (200 * 1024), "application/json"),
    ("POST", "/v1/nobody/translate", b'{"lines": ["a"]}', "application/json"),
    ("POST", "/v1/en_fr/summarise", b'{"lines": ["a"]}', "application/json"),
    ("POST", "/v1/en_fr/predict", b'{"lines": ["a"]}', "application/json"),
    ("POST", "/v1/sentiment/translate", b'{"lines": ["a"]}', "application/json"),
    ("POST", "/v1/chars/generate", b'{"length": 10000000}', "application/json"),
    ("POST", "/v1/chars/generate", b'{"temperature": -1}', "application/json"),
    ("POST", "/v1/load/forecast", b'{"csv": "a,b\\n1,2\\n"}', "application/json"),
    ("GET", "/v1/en_fr/translate", b"", None),
    ("GET", "/nowhere", b"", None),
]


@pytest.mark.parametrize("method,path,body,ctype", BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_lives_on(client, method, path, body, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = client.request(method, path, content=body, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error
    assert client.post("/v1/en_fr/translate", json={"lines": ["the dog"], "beam": 1}).status_code == 200


def test_a_full_queue_answers_busy():
    release = threading.Event()

    def run(key, items):
        release.wait(5)
        return items

    async def scenario():
        batcher = Batcher(run, Limits(max_batch=2, max_wait_ms=0, max_queue=2), ThreadPoolExecutor(1))
        worker = asyncio.create_task(batcher.serve_forever())
        first = asyncio.create_task(batcher.submit("k", ["a", "b"]))      # taken by the worker, blocks
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.submit("k", ["c", "d"]))     # fills the queue
        await asyncio.sleep(0.01)
        with pytest.raises(Busy):
            await batcher.submit("k", ["e"])
        release.set()
        results = await asyncio.gather(first, queued)
        worker.cancel()
        return results, batcher.batches

    assert asyncio.run(scenario()) == ([["a", "b"], ["c", "d"]], 2)


def test_one_bad_request_in_a_merged_batch_fails_alone():
    def run(key, items):
        if "bad" in items:
            raise ValueError("cannot decode 'bad'")
        return [x.upper() for x in items]

    async def scenario():
        batcher = Batcher(run, Limits(max_batch=8, max_wait_ms=50), ThreadPoolExecutor(1))
        worker = asyncio.create_task(batcher.serve_forever())
        answers = await asyncio.gather(*(batcher.submit("k", items) for items in (["a"], ["bad"], ["b", "c"])),
                                       return_exceptions=True)
        worker.cancel()
        return answers

    good, bad, more = asyncio.run(scenario())
    assert good == ["A"] and more == ["B", "C"]
    assert isinstance(bad, ValueError)


def test_the_model_process_raises_what_loading_raises_and_exits_with_its_server(tmp_path, checkpoints):
    from rnnkit.training.checkpoint import CheckpointError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as raised:
        ModelProcess({"bad": str(bad)})
    with pytest.raises(CheckpointError) as alone:
        rnnkit.load(bad)
    assert str(raised.value) == str(alone.value)
    from rnnkit.config import ConfigError

    worker = ModelProcess({"pos": str(checkpoints["pos"])})
    pos = worker.models["pos"]
    with pytest.raises(ConfigError, match="^expected a string or a list of strings$"):   # raised there, here
        pos.predict([1, 2])
    assert pos.predict(["calm water"], 4) == rnnkit.load(checkpoints["pos"]).predict(["calm water"], 4)
    worker.close()
    assert worker.process.exitcode == 0

    import torch

    from rnnkit.serve.worker import _plain
    from rnnkit.tasks.translation import Translation

    found = Translation("a b", -1.0, ["x"], ["a", "b"], torch.ones(3, 1))
    sent = _plain([(7, found), (8, [found, found])])       # what a stream step and n-best return
    assert sent == [(7, found._replace(attention=[[1.0]] * 3)), (8, [found._replace(attention=[[1.0]] * 3)] * 2)]
    assert not any(isinstance(v, torch.Tensor) for _, r in sent for t in ([r] if isinstance(r, Translation) else r)
                   for v in t)                              # no tensor goes over the pipe

    worker = ModelProcess({"pos": str(checkpoints["pos"])})
    with TestClient(build_app(worker.models), raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200
        worker.process.kill()                   # as the kernel does to a process out of memory
        worker.process.join()
        r = c.post("/v1/pos/predict", json={"lines": ["calm water"]})
        assert r.status_code == 503 and "model process exited" in r.json()["error"]
        r = c.get("/health")
        assert r.status_code == 503 and "model process has exited" in r.json()["error"]
    worker.close()


def test_names_and_bad_checkpoints_are_one_line_errors(tmp_path):
    assert model_names(["runs/en_fr/best.pt", "big=runs/x/last.pt"]) == {"en_fr": "runs/en_fr/best.pt",
                                                                      "big": "runs/x/last.pt"}
    from rnnkit.config import ConfigError

    with pytest.raises(ConfigError, match="two models named"):
        model_names(["a/best.pt", "a/last.pt"])
    result = runner.invoke(cli_app, ["serve", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "missing.pt" in result.output
    (tmp_path / "exports" / "char_lm").mkdir(parents=True)       # an export folder: named after itself
    assert model_names([str(tmp_path / "exports" / "char_lm"), "/best.pt"]) == {
        "char_lm": str(tmp_path / "exports" / "char_lm"), "best": "/best.pt"}
    result = runner.invoke(cli_app, ["serve", "/missing.pt"])      # at the root: not found, not a naming error
    assert result.exit_code == 2 and "/missing.pt" in result.output and "model name" not in result.output


def test_a_port_in_use_is_one_line_before_any_model_loads(checkpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli_app, ["serve", str(checkpoints["en_fr"]), "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "another server" in result.output
    assert "loaded" not in result.output and "Errno" not in result.output


@pytest.mark.parametrize("route, body, task, right", [
    ("generate", {"lines": ["a"]}, "translation", "translate"),
    ("translate", {"length": 5}, "lm", "generate"),
    ("predict", {"lines": ["a"], "beam": 2}, "translation", "translate"),
])
def test_a_route_the_model_lacks_names_its_task_and_route(client, route, body, task, right):
    name = "en_fr" if task == "translation" else "chars"
    r = client.post(f"/v1/{name}/{route}", json=body)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == f"model '{name}' is a {task} model: it has no /{route}; use /v1/{name}/{right}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_sigterm_answers_every_accepted_request_then_exits(checkpoints):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rnnkit", "serve", f"en_fr={checkpoints['en_fr']}",
                             f"chars={checkpoints['chars']}", "--port", str(port), "--max-batch", "8"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start: " + proc.stdout.read())
        lines = SENTENCES * 8          # 64 sentences a request, beam 5: each request takes a while
        expected = [t["text"] for t in _post(base + "/v1/en_fr/translate", {"lines": lines, "beam": 5})["translations"]]

        def ask(i: int):
            return _post(base + "/v1/en_fr/translate", {"lines": lines, "beam": 5}), time.perf_counter()

        stream = _post(base + "/v1/chars/streams", {"text": "The harbour"})["id"]

        def feed(piece: str):                # live-stream feeds, each sampling a long continuation
            return (_post(f"{base}/v1/chars/streams/{stream}", {"text": piece, "continuation": 1000}),
                    time.perf_counter())

        with ThreadPoolExecutor(10) as pool:
            pending = [pool.submit(ask, i) for i in range(8)]
            time.sleep(0.3)
            feeds = [pool.submit(feed, piece) for piece in (" was", " quiet")]
            time.sleep(0.2)                  # accepted and queued behind one another
            unanswered = sum(not p.done() for p in pending)
            unfed = sum(not f.done() for f in feeds)
            signalled = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            answers = [p.result(timeout=120) for p in pending]
            fed = [f.result(timeout=120) for f in feeds]
        # the feeds in flight were answered too, after the signal, each from the state before it
        first, second = sorted(a["position"] for a, _ in fed)          # in whichever order they were taken
        assert first in (len("The harbour was"), len("The harbour quiet")) and second == len("The harbour was quiet")
        assert unfed == 2 and all(done > signalled for _, done in fed)
        assert all(len(a["continuation"]["tokens"]) == 1000 for a, _ in fed)
        # the signal went out while requests were still pending, and those were answered after it
        assert unanswered >= 2, f"only {unanswered} requests were pending at SIGTERM; the test proves nothing"
        assert sum(done > signalled for _, done in answers) >= 2
        assert all([t["text"] for t in a["translations"]] == expected for a, _ in answers)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)    # uvicorn ends as SIGTERM would, once drained
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class CountdownStream:
    """A fake stream: an item is done after as many steps as it has characters; 'bad' cannot start."""

    def __init__(self, capacity: int, log: list):
        self.capacity, self.log, self.items = capacity, log, {}

    @property
    def room(self) -> int:
        return self.capacity - len(self.items)

    @property
    def live(self) -> int:
        return len(self.items)

    def add(self, items, tags):
        if any(x == "bad" for x in items):
            raise ValueError("cannot start 'bad'")
        assert len(items) <= self.room
        self.log.append(list(items))
        self.items.update({tag: [x, len(x)] for x, tag in zip(items, tags)})
        return []

    def step(self):
        for entry in self.items.values():
            entry[1] -= 1
        done = [(tag, x.upper()) for tag, (x, left) in self.items.items() if left <= 0]
        for tag, _ in done:
            del self.items[tag]
        return done


def test_a_stream_answers_requests_as_their_items_finish_and_a_bad_one_fails_alone():
    """Continuous batching in the batcher: items join as others leave (never more than the
    capacity at once), a request longer than the capacity is fed in parts, each request gets
    its answers in order, a request that cannot start fails alone, and another key waits its turn."""
    log: list = []
    streams: list = []

    def stream(key):
        if key != "s":
            return None
        streams.append(CountdownStream(3, log))
        return streams[-1]

    async def scenario():
        batcher = Batcher(lambda key, items: [f"plain {x}" for x in items], Limits(max_batch=3, max_wait_ms=0),
                          ThreadPoolExecutor(1), stream)
        worker = asyncio.create_task(batcher.serve_forever())
        requests = [("s", ["aaaaaa"]), ("s", ["b", "cc", "ddd", "e", "ff"]), ("s", ["bad"]), ("s", []),
                    ("other", ["x"]), ("s", ["g"])]
        answers = await asyncio.gather(*(batcher.submit(k, items) for k, items in requests), return_exceptions=True)
        worker.cancel()
        return answers, batcher

    answers, batcher = asyncio.run(scenario())
    assert answers[0] == ["AAAAAA"] and answers[1] == ["B", "CC", "DDD", "E", "FF"]
    assert isinstance(answers[2], ValueError) and answers[3] == []
    assert answers[4] == ["plain x"] and answers[5] == ["G"]
    assert sorted(x for group in log for x in group) == sorted(["aaaaaa", "b", "cc", "ddd", "e", "ff", "g"])
    assert len(log[0]) == 3 and len(streams) == 2      # the first group fills the capacity; "other" split the run
    assert batcher.items_done == 8 and not batcher.queue           # 7 streamed, 1 plain
