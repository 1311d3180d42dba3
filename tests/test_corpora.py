"""rnnkit data list / get: a registry of the corpora with checksums; fetching from a folder or
a URL verifies every byte and never leaves a bad copy in place."""
from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading

import pytest
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.data.corpora import CORPORA
from tests.conftest import SHARED_DATA

runner = CliRunner()
needs_data = pytest.mark.skipif(not (SHARED_DATA / "ett" / "ETTh1.csv").is_file(),
                                reason="../shared/data (the corpora) is absent")


def test_list_names_every_corpus_the_configs_use():
    rows = json.loads(runner.invoke(app, ["data", "list", "--json", "--to", str(SHARED_DATA)]).stdout)
    assert {r["name"] for r in rows} == {"tinyshakespeare", "multi30k", "ud-english-ewt", "uner-english-ewt",
                                         "rt-polarity", "ett"}
    assert all(r["licence"] and r["source"] and all(len(f["sha256"]) == 64 for f in r["files"]) for r in rows)


@needs_data
def test_registered_checksums_match_the_shared_copies():
    import hashlib
    for c in CORPORA.values():
        for rel, size, sha in c.files:
            data = (SHARED_DATA / c.name / rel).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), f"{c.name}/{rel}"


@needs_data
def test_get_from_a_folder_verifies_and_lays_out(tmp_path):
    result = runner.invoke(app, ["data", "get", "rt-polarity", "--from", str(SHARED_DATA), "--to", str(tmp_path)])
    assert result.exit_code == 0, result.output
    copied, original = tmp_path / "rt-polarity" / "train.tsv", SHARED_DATA / "rt-polarity" / "train.tsv"
    assert copied.read_bytes() == original.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rt-polarity"]


@needs_data
@pytest.mark.parametrize("damage", ["flip a byte", "truncate"])
def test_a_corrupted_copy_is_refused_and_nothing_left(tmp_path, damage):
    mirror = tmp_path / "mirror"
    shutil.copytree(SHARED_DATA / "rt-polarity", mirror / "rt-polarity")
    target = mirror / "rt-polarity" / "dev.tsv"
    raw = bytearray(target.read_bytes())
    if damage == "flip a byte":
        raw[1000] ^= 1
    else:
        raw = raw[: len(raw) // 2]
    target.write_bytes(bytes(raw))
    dest = tmp_path / "data"
    result = runner.invoke(app, ["data", "get", "rt-polarity", "--from", str(mirror), "--to", str(dest)])
    assert result.exit_code == 2 and "corrupted or partial copy, not installed" in result.output
    assert list(dest.iterdir()) == []           # no corpus folder, no staging leftovers


@needs_data
def test_get_downloads_from_a_local_http_server(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SHARED_DATA))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = runner.invoke(app, ["data", "get", "ett", "--from", url, "--to", str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "ett" / "ETTh1.csv").stat().st_size == 2589657
        result = runner.invoke(app, ["data", "get", "ett", "--from", url + "/nothing-here", "--to", str(tmp_path)])
        assert result.exit_code == 2 and "cannot download" in result.output
        assert (tmp_path / "ett" / "ETTh1.csv").stat().st_size == 2589657     # the good copy stays
    finally:
        server.shutdown()


def test_unknown_corpus_and_no_public_download(tmp_path):
    result = runner.invoke(app, ["data", "get", "imagenet", "--to", str(tmp_path)])
    assert result.exit_code == 2 and "no corpus named 'imagenet'" in result.output
    result = runner.invoke(app, ["data", "get", "multi30k", "--to", str(tmp_path)])
    assert result.exit_code == 2 and "no public download of these exact files" in result.output
