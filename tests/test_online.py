"""Online forecasting (``rnnkit online``, ``Forecaster.online``, ``Forecaster.learner``): a
forecaster that forecasts at each arriving row and learns from what has arrived, under the
leak-free and the published (FSNet) protocols."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import rnnkit
from rnnkit.cli import app
from rnnkit.tasks.online import Online, replay
from tests.conftest import ROOT
from tests.test_forecast import seasonal_series, write_csv
from tests.test_forecast import train as train_forecaster

runner = CliRunner()


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    series = write_csv(tmp / "series.csv", seasonal_series(700))
    train_forecaster(tmp, series, model={"dropout": 0.0}, train={"max_steps": 30, "eval_every": 30})
    return tmp / "run" / "best.pt", series


def _values(m, series):
    return m.task.standardised_values(m.task.read(str(series), m.task.columns))


def test_the_leak_free_protocol_never_reads_a_row_before_it_arrives(forecaster):
    """The rows come from an iterator that hands out NaN for any row taken before its arrival
    (before the forecast made just ahead of it): leak-free runs through clean and equals a
    learner fed the rows one at a time; the published protocol takes rows early, and only
    its NaN-skipped updates keep its weights finite."""
    ckpt, series = forecaster
    m = rnnkit.load(ckpt)
    values = _values(m, series)
    start, count = 500, 60
    forecasts_made = [0]
    predict = m.task.predict_windows
    m.task.predict_windows = lambda x: (forecasts_made.__setitem__(0, forecasts_made[0] + 1), predict(x))[1]

    def poisoned():
        for row, value in enumerate(values):
            arrived = row < start or forecasts_made[0] > row - start    # its origin's forecast is made
            yield value if arrived else np.full_like(value, np.nan)

    settings = Online(lr=0.05)
    weights = copy.deepcopy(m.task.model.state_dict())
    clean, learner = replay(m.task, poisoned(), start, count, settings)
    assert np.isfinite(clean).all() and learner.skipped == 0 and learner.updates == count
    m.task.model.load_state_dict(weights)
    live = m.learner(m.task.scaler.inverse(values[:start].astype(np.float64)), settings)
    one_by_one = [live.learner.forecast()]
    for t in range(start, start + count - 1):
        live.arrive(m.task.scaler.inverse(values[t].astype(np.float64)))
        one_by_one.append(live.learner.forecast())
    assert np.allclose(np.asarray(one_by_one), clean, atol=1e-5)
    m.task.model.load_state_dict(weights)
    forecasts_made[0] = 0
    _, leaky = replay(m.task, poisoned(), start, count, Online(protocol="published", lr=0.05))
    assert leaky.skipped > 0                                   # it read rows before their arrival
    assert all(torch.isfinite(p).all() for p in m.task.model.parameters())   # and skipped them: no NaN weights


def test_the_published_protocol_is_the_hand_computed_two_steps(forecaster):
    ckpt, series = forecaster
    m = rnnkit.load(ckpt)
    values = _values(m, series)
    L, H, targets = m.task.cfg.data.input_length, m.task.cfg.data.horizon, m.task.targets
    start = 400
    hand = copy.deepcopy(m.task.model).eval()
    expected = []
    for t in (start, start + 1):                  # forecast the window at t, then an SGD step on its whole target
        x = torch.from_numpy(values[t - L:t][None].astype(np.float32))
        y = torch.from_numpy(values[t:t + H][None][..., targets].astype(np.float32))
        with torch.no_grad():
            expected.append(hand(x)[0].numpy())
        hand.zero_grad()
        F.mse_loss(hand(x), y).backward()
        with torch.no_grad():
            for p in hand.parameters():
                p -= 0.1 * p.grad
    got, learner = replay(m.task, iter(values), start, 2, Online(protocol="published", optimizer="sgd", lr=0.1))
    assert learner.updates == 2
    assert np.allclose(got, np.asarray(expected), atol=1e-6)
    for (name, p), q in zip(m.task.model.named_parameters(), hand.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_the_cli_reports_online_against_frozen_and_saves_the_adapted_model(forecaster, tmp_path):
    ckpt, series = forecaster
    before = ckpt.read_bytes()
    out, saved = tmp_path / "f.csv", tmp_path / "adapted.pt"
    args = ["online", str(ckpt), "--data", str(series), "--start", "500", "--json"]
    frozen = json.loads(runner.invoke(app, [*args, "--lr", "0"]).stdout)
    assert frozen["online_mse"] == pytest.approx(frozen["frozen_mse"], rel=1e-6) and frozen["updates"] == 0
    result = runner.invoke(app, [*args, "--lr", "0.05", "--replay", "32", "-o", str(out), "--save", str(saved)])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["frozen_mse"] == frozen["frozen_mse"] and r["online_mse"] != r["frozen_mse"]
    lines = out.read_text().splitlines()
    assert lines[0] == "origin,step,column,online,frozen,truth" and len(lines) == 1 + r["windows"] * 24 * 2
    assert ckpt.read_bytes() == before
    adapted = rnnkit.load(saved)
    weights = dict(adapted.task.model.named_parameters())
    assert any(not torch.equal(p, weights[n]) for n, p in rnnkit.load(ckpt).task.model.named_parameters())


@pytest.mark.parametrize("extra,message", [
    (["--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--protocol", "future"], "--protocol must be one of leak-free, published"),
    (["--start", "5000"], "--start 5000"),
])
def test_bad_online_options_are_one_line(forecaster, extra, message):
    ckpt, series = forecaster
    args = ["online", str(ckpt), "--data", str(series), "--start", "500", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1


def test_a_series_without_the_models_columns_is_one_line(forecaster, tmp_path):
    ckpt, _ = forecaster
    bad = write_csv(tmp_path / "bad.csv", {"load": seasonal_series(600)["load"]})
    result = runner.invoke(app, ["online", str(ckpt), "--data", str(bad), "--start", "500"])
    assert result.exit_code == 2 and "temp" in result.output and len(result.output.strip().splitlines()) == 1


def test_kill_9_during_online_leaves_no_output_file(forecaster, tmp_path):
    ckpt, series = forecaster
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "rnnkit", "online", str(ckpt), "--data", str(series), "--start",
                             "100", "--updates", "20", "-o", str(out / "f.csv"), "--save", str(out / "a.pt")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:        # until it is learning (its bar on stderr)
        line = proc.stderr.readline()
        if "arrival" in line or not line:
            break
    time.sleep(0.5)
    assert proc.poll() is None, "it finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.iterdir()) == []
