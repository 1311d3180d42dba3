"""Time-series forecasting: CSV reading, splits without leakage, windows, baselines, the model,
evaluation and prediction from a checkpoint."""
from __future__ import annotations

import csv
import json
import math
import re
from datetime import datetime, timedelta

import pytest
import torch
from typer.testing import CliRunner

from rnnkit.cli import app
from rnnkit.config import ConfigError, load_config
from rnnkit.data.series import read_series, split_rows, window_starts
from rnnkit.data.vocab import DataError
from rnnkit.runs import load_task, prepare_trainer
from rnnkit.tasks.forecast_text import seasonal_positions
from tests.conftest import SHARED_DATA, write_yaml

runner = CliRunner()
START = datetime(2020, 1, 1)


def write_csv(path, columns: dict[str, list], start=START, times=None):
    n = len(next(iter(columns.values())))
    times = times or [str(start + timedelta(hours=i)) for i in range(n)]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["date", *columns])
        for i in range(n):
            w.writerow([times[i], *(columns[c][i] for c in columns)])
    return path


def seasonal_series(n: int, seed: int = 0) -> dict[str, list[float]]:
    """Trend + daily season + noise, two related columns."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64)
    season = torch.sin(2 * math.pi * t / 24) + 0.5 * torch.sin(2 * math.pi * t / 12 + 1.0)
    a = 0.01 * t + 2 * season + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    b = 10 + 0.5 * a + torch.cos(2 * math.pi * t / 24) + 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
    return {"load": a.tolist(), "temp": b.tolist()}


def forecast_config(tmp_path, csv_path, name="run", **sections) -> dict:
    cfg = {"task": "forecast", "run_dir": str(tmp_path / name), "seed": 3,
           "data": {"path": str(csv_path), "split": [0.7, 0.85, 1.0], "input_length": 48, "horizon": 24,
                    "season": 24},
           "model": {"cell": "gru", "hidden_size": 32, "segment": 4},
           "train": {"batch_size": 32, "eval_batch_size": 256, "max_steps": 30, "log_every": 10,
                     "eval_every": 15, "lr": 0.005, "metric": "valid_mse"}}
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def train(tmp_path, csv_path, name="run", **sections):
    path = write_yaml(tmp_path / f"{name}.yaml", forecast_config(tmp_path, csv_path, name, **sections))
    trainer = prepare_trainer(load_config(path))
    trainer.fit()
    return trainer


@pytest.fixture
def series_csv(tmp_path):
    return write_csv(tmp_path / "series.csv", seasonal_series(1200))


# ---------------------------------------------------------------- reading and splitting
@pytest.mark.parametrize("cell,message", [
    ("", "row 3 (line 5), column temp: missing value"),
    ("NaN", "row 3 (line 5), column temp: missing value"),
    ("warm", "row 3 (line 5), column temp: 'warm' is not a number"),
    ("inf", "row 3 (line 5), column temp: 'inf' is not a finite number"),
])
def test_bad_cells_name_file_row_and_column(tmp_path, cell, message):
    cols = {"load": [1.0] * 6, "temp": [2.0] * 6}
    cols["temp"][3] = cell
    path = write_csv(tmp_path / "bad.csv", cols)
    with pytest.raises(DataError, match=re.escape(f"bad.csv: {message}")):
        read_series(path, "date")


@pytest.mark.parametrize("swap,message", [
    (lambda t: t.__setitem__(4, t[3]), r"row 4 \(line 6\), column date: timestamp .* duplicates"),
    (lambda t: t.__setitem__(4, t[1]), r"row 4 \(line 6\), column date: timestamp .* comes before"),
    (lambda t: t.__setitem__(2, "yesterday"), r"row 2 \(line 4\), column date: 'yesterday' is not a timestamp"),
])
def test_bad_timestamps_are_errors(tmp_path, swap, message):
    times = [str(START + timedelta(hours=i)) for i in range(6)]
    swap(times)
    path = write_csv(tmp_path / "t.csv", {"x": list(range(6))}, times=times)
    with pytest.raises(DataError, match=message):
        read_series(path, "date")


def test_missing_columns_and_ragged_rows(tmp_path):
    path = write_csv(tmp_path / "s.csv", {"x": [1, 2, 3]})
    with pytest.raises(DataError, match="no time column 'time'"):
        read_series(path, "time")
    with pytest.raises(DataError, match="no column 'OT'"):
        read_series(path, "date", ["OT"])
    with open(path, "a") as fh:
        fh.write("2020-01-01 03:00:00,4,5\n")
    with pytest.raises(DataError, match=r"row 3 \(line 5\): 3 fields, the header has 2"):
        read_series(path, "date")


def test_split_rows_by_row_numbers_and_fractions():
    assert split_rows([8640, 11520, 14400], 17420, "f") == [(0, 8640), (8640, 11520), (11520, 14400)]
    assert split_rows([0.7, 0.8, 1.0], 1000, "f") == [(0, 700), (700, 800), (800, 1000)]
    with pytest.raises(DataError, match="has 100 rows, but data.split reaches row 200"):
        split_rows([50, 100, 200], 100, "f")


def test_windows_respect_split_edges():
    # targets inside [first, end), inputs in the file (reaching back is allowed)
    starts = window_starts(100, 200, 48, 24)
    assert int(starts[0]) == 100 and int(starts[-1]) + 24 == 200
    assert int(window_starts(0, 100, 48, 24)[0]) == 48


def test_seasonal_positions_repeat_the_last_season():
    pos = seasonal_positions(48, 60, 24)
    assert pos[:24].tolist() == list(range(24, 48))      # one day back
    assert pos[24:48].tolist() == list(range(24, 48))    # the same day repeated
    assert pos[48:].tolist() == list(range(24, 36))


def test_no_validation_or_test_value_reaches_training(tmp_path):
    clean = seasonal_series(600)
    planted = {k: list(v) for k, v in clean.items()}
    for k in planted:                          # a marker in every validation and test row
        planted[k][400:] = [1e6] * 200
    path = write_csv(tmp_path / "planted.csv", planted)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", forecast_config(
        tmp_path, path, data={"split": [400, 500, 600]})))
    task = load_task_from_config(cfg)
    reference = torch.tensor([clean[k][:400] for k in clean], dtype=torch.float64).T
    assert torch.allclose(torch.from_numpy(task.scaler.mean), reference.mean(0))
    assert torch.allclose(torch.from_numpy(task.scaler.std), reference.std(0, correction=0))
    seen = torch.cat([torch.cat([x.flatten(), y.flatten()]) for x, y in
                      (task.windows_at(task.values, b) for b in task.train_batches(0))])
    marker = task.scaler.transform(torch.full((1, 2), 1e6, dtype=torch.float64)).min().item()
    assert seen.abs().max().item() < marker / 100        # nothing near the planted value
    assert int(task.windows["train"].max()) + 24 <= 400


def test_windows_line_up_with_timestamps_at_split_edges(tmp_path, series_csv):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", forecast_config(
        tmp_path, series_csv, data={"split": [700, 950, 1200]})))
    task = load_task_from_config(cfg)
    times, values = task.series.times, task.values
    first_valid = task.windows["valid"][:1]
    x, y = task.windows_at(values, first_valid)
    assert torch.equal(y[0, 0], values[700])            # the first validation target is row 700 ...
    assert torch.equal(x[0, -1], values[699])           # ... its input ends at row 699, in train
    assert times[int(first_valid)] == START + timedelta(hours=700)
    last_train = task.windows["train"][-1:]
    _, y = task.windows_at(values, last_train)
    assert torch.equal(y[0, -1], values[699])           # the last training target is row 699
    assert int(task.windows["test"][-1]) + 24 == 1200


def load_task_from_config(cfg):
    from rnnkit.tasks import task_module
    return task_module("forecast").build(cfg, torch.device("cpu"))


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("section,values,key", [
    ("model", {"segment": 5}, "model.segment"),
    ("data", {"season": 100}, "data.season"),
    ("data", {"inputs": ["load"], "targets": ["temp"]}, "data.targets"),
    ("data", {"split": [0.8, 0.7, 1.0]}, "data.split"),
    ("data", {"split": [700.5, 800, 900]}, "data.split"),
    ("train", {"metric": "valid_bleu"}, "train.metric"),
])
def test_config_errors_name_the_key(tmp_path, series_csv, section, values, key):
    path = write_yaml(tmp_path / "c.yaml", forecast_config(tmp_path, series_csv, **{section: values}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("options", [
    {"channels": "independent", "instance_norm": "last", "decoder": "direct"},
    {"channels": "joint", "instance_norm": "mean_std", "decoder": "recurrent", "cell": "lstm"},
    {"channels": "independent", "instance_norm": "mean_std", "decoder": "recurrent", "impl": "explicit",
     "layer_norm": True},
])
def test_model_beats_both_baselines_on_a_seasonal_series(tmp_path, series_csv, options):
    trainer = train(tmp_path, series_csv, model=options, train={"max_steps": 240, "eval_every": 80})
    results = trainer.task.score(trainer.task.values, trainer.task.windows["test"], 256)
    assert results["mse"] < 0.8 * results["seasonal_mse"]
    assert results["mse"] < 0.8 * results["last_value_mse"]
    assert results["mae"] < results["seasonal_mae"] and results["mae"] < results["last_value_mae"]


def test_recurrent_decoder_reads_the_truth_only_under_teacher_forcing(tmp_path, series_csv):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", forecast_config(
        tmp_path, series_csv, model={"decoder": "recurrent"})))
    task = load_task_from_config(cfg)
    x, y = task.windows_at(task.values, task.windows["valid"][:8])
    other = y + 5.0
    with torch.no_grad():
        assert torch.equal(task.model(x, y, 0.0), task.model(x, other, 0.0))
        forced, forced_other = task.model(x, y, 1.0), task.model(x, other, 1.0)
    assert torch.equal(forced[:, :4], forced_other[:, :4])       # the first segment comes from the input
    assert not torch.allclose(forced[:, 4:], forced_other[:, 4:])


def test_teacher_forcing_schedule_is_logged(tmp_path, series_csv):
    trainer = train(tmp_path, series_csv, model={"decoder": "recurrent"},
                    train={"teacher_forcing": {"schedule": "linear", "start": 1.0, "end": 0.0, "steps": 20}})
    rows = [json.loads(r) for r in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    ratios = [r["teacher_forcing"] for r in rows if r["kind"] == "train"]
    assert ratios[0] == pytest.approx(1 - 9 / 20) and ratios[-1] == 0.0


def test_mae_loss_trains(tmp_path, series_csv):
    trainer = train(tmp_path, series_csv, model={"loss": "mae"}, train={"metric": "valid_mae"})
    evals = [json.loads(r) for r in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in r]
    assert all(e["valid_loss"] == e["valid_mae"] for e in evals)


# ---------------------------------------------------------------- checkpoints and the command line
def test_eval_and_predict_from_the_checkpoint(tmp_path, series_csv):
    trainer = train(tmp_path, series_csv, train={"max_steps": 60, "eval_every": 60})
    run = trainer.run_dir
    valid = trainer.progress.last_eval
    out = runner.invoke(app, ["eval", str(run / "last.pt"), "--data", str(series_csv), "--split", "valid",
                              "--json"])
    assert out.exit_code == 0, out.output
    results = json.loads(out.stdout)
    assert results["mse"] == pytest.approx(valid["valid_mse"], rel=1e-5)
    assert results["seasonal_mse"] == pytest.approx(valid["valid_seasonal_mse"], rel=1e-6)
    assert results["rows"] == "[840, 1020)" and results["windows"] == 180 - 24 + 1

    csv_out, png = tmp_path / "f.csv", tmp_path / "f.png"
    out = runner.invoke(app, ["predict", str(run / "best.pt"), "--data", str(series_csv), "--at", "1100",
                              "-o", str(csv_out), "--plot", str(png), "--column", "load"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == 24 * 2 and png.stat().st_size > 10_000
    assert rows[0]["origin"] == str(START + timedelta(hours=1099))
    assert rows[0]["timestamp"] == str(START + timedelta(hours=1100)) and rows[-1]["step"] == "24"
    # round trip: values in original units, standardised back, are the model's own forecast
    task = load_task(run / "best.pt", "cpu", with_data=True)
    x, y = task.windows_at(task.values, torch.tensor([1100]))
    with torch.no_grad():
        expected = task.model(x)[0].double()
    got = torch.tensor([[float(r["value"]) for r in rows[k * 2:(k + 1) * 2]] for k in range(24)],
                       dtype=torch.float64)
    assert torch.allclose(task.scaler.transform(got), expected, atol=1e-5)
    truth = torch.tensor([[float(r["truth"]) for r in rows[k * 2:(k + 1) * 2]] for k in range(24)])
    assert torch.allclose(truth.double(), torch.from_numpy(task.series.values[1100:1124]), atol=1e-6)


def test_predict_past_the_end_and_every_window(tmp_path, series_csv):
    trainer = train(tmp_path, series_csv, train={"max_steps": 15, "eval_every": 15})
    out = runner.invoke(app, ["predict", str(trainer.run_dir / "best.pt"), "--data", str(series_csv)])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(out.stdout.splitlines()))
    assert len(rows) == 48 and rows[0]["truth"] == ""
    assert rows[-1]["timestamp"] == str(START + timedelta(hours=1200 + 23))
    short = write_csv(tmp_path / "short.csv", {k: v[:60] for k, v in seasonal_series(60).items()})
    out = runner.invoke(app, ["predict", str(trainer.run_dir / "best.pt"), "--data", str(short), "--every"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(out.stdout.splitlines()))
    assert len(rows) == (60 - 48 + 1) * 24 * 2


@pytest.mark.parametrize("args,message", [
    (["--at", "10"], "--at 10: needs 48 rows before it"),
    (["--column", "nope"], "--column 'nope' is not a forecast column"),
    (["--every", "--at", "100"], "--at and --every"),
])
def test_predict_bad_options(tmp_path, series_csv, args, message):
    trainer = train(tmp_path, series_csv, train={"max_steps": 15, "eval_every": 15})
    out = runner.invoke(app, ["predict", str(trainer.run_dir / "best.pt"), "--data", str(series_csv), *args])
    assert out.exit_code == 2 and message in out.output


def test_bad_csv_through_the_command_line(tmp_path, series_csv):
    trainer = train(tmp_path, series_csv, train={"max_steps": 15, "eval_every": 15})
    cols = seasonal_series(100)
    cols["temp"][50] = "n/a"
    bad = write_csv(tmp_path / "bad.csv", cols)
    out = runner.invoke(app, ["eval", str(trainer.run_dir / "best.pt"), "--data", str(bad)])
    assert out.exit_code == 2 and "bad.csv: row 50 (line 52), column temp: missing value" in out.output
    out = runner.invoke(app, ["train", str(write_yaml(tmp_path / "b.yaml", forecast_config(tmp_path, bad, "b")))])
    assert out.exit_code == 2 and "missing value" in out.output
    assert not (tmp_path / "b").exists()      # nothing written for a run that cannot start


@pytest.mark.skipif(not (SHARED_DATA / "ett" / "ETTh1.csv").is_file(),
                    reason="../shared/data/ett/ETTh1.csv is absent")
def test_etth1_config_reads_the_literature_split(tmp_path):
    cfg = load_config("configs/forecast_etth1.yaml", [f"run_dir={tmp_path / 'r'}"])
    task = load_task_from_config(cfg)
    assert task.bounds == [(0, 8640), (8640, 11520), (11520, 14400)]
    assert task.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert len(task.windows["test"]) == 2880 - 96 + 1
    assert task.series.times[int(task.windows["test"][0])] == datetime(2017, 10, 24, 0, 0)
