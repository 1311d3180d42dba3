"""Time-series forecasting: a CSV file in, MSE and MAE on the next ``horizon`` rows out,
beside the two baselines every forecast must beat (repeat the last value; repeat the value
one season back).

The protocol is the long-horizon forecasting literature's (Informer, Autoformer, DLinear,
PatchTST): splits in time order, each column standardised with the training rows' mean and
standard deviation, metrics on the standardised values averaged over every window (stride 1),
horizon step and target column. No validation or test row reaches a training window or the
statistics.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from rnnkit.config import Config, ConfigError
from rnnkit.config.forecast import DataConfig, ModelConfig  # noqa: F401  (this task's sections)
from rnnkit.data.series import Scaler, Series, gather_windows, read_series, split_rows, window_starts
from rnnkit.data.vocab import DataError
from rnnkit.models.forecast import Forecaster
from rnnkit.training.teacher_forcing import TeacherForcingSchedule
from rnnkit.training.interface import StepResult

SPLITS = ("train", "valid", "test")


def seasonal_positions(input_length: int, horizon: int, season: int) -> torch.Tensor:
    """Where in the input window the seasonal baseline finds each horizon step's value: step k
    repeats the row one season (or as many whole seasons as it takes) before it."""
    k = torch.arange(horizon)
    return input_length + k - season * (k // season + 1)


class ForecastTask:
    def __init__(self, cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
                 with_data: bool = True):
        self.cfg, self.device = cfg, device
        d, m = cfg.data, cfg.model
        self.series: Series | None = None
        if extras is None:
            self.series = self.read(d.path, d.inputs)
            self.columns = self.series.columns
            self.target_names = list(d.targets or self.columns)
            self.bounds = split_rows(d.split, len(self.series), d.path)
            self.scaler = Scaler.fit(self.series.values[: self.bounds[0][1]])
        else:
            self.columns, self.target_names = list(extras["columns"]), list(extras["targets"])
            self.scaler = Scaler.from_state(extras["scaler"])
            if with_data:
                self.series = self.read(d.path, self.columns)
                self.bounds = split_rows(d.split, len(self.series), d.path)
        missing = [t for t in self.target_names if t not in self.columns]
        if missing:
            raise ConfigError("data.targets", f"{missing[0]!r} is not among the input columns "
                                              f"({', '.join(self.columns)})")
        self.targets = [self.columns.index(t) for t in self.target_names]
        self.model = Forecaster(len(self.columns), self.targets, m, d.input_length, d.horizon).to(device)
        self.teacher_forcing = TeacherForcingSchedule(cfg.train.teacher_forcing)
        self.season_at = seasonal_positions(d.input_length, d.horizon, d.season).to(device)
        if self.series is not None:
            self.values = self.standardised(self.series)
            self.windows = {}
            for name, (first, end) in zip(SPLITS, self.bounds):
                self.windows[name] = window_starts(first, end, d.input_length, d.horizon).to(device)
            for name in ("train", "valid"):
                if len(self.windows[name]) == 0:
                    first, end = self.bounds[SPLITS.index(name)]
                    raise DataError(f"{d.path}: the {name} rows [{first}, {end}) hold no whole window of "
                                    f"{d.input_length} input and {d.horizon} target rows; change data.split, "
                                    f"data.input_length or data.horizon")

    def read(self, path: str, columns: list[str] | None) -> Series:
        series = read_series(path, self.cfg.data.time_column, columns)
        need = self.cfg.data.input_length + 1
        if len(series) < need:
            raise DataError(f"{path}: has {len(series)} rows; a window needs at least {need}")
        return series

    def standardised(self, series: Series) -> torch.Tensor:
        return self.scaler.transform(series.values).float().to(self.device)

    def extras(self) -> dict[str, Any]:
        return {"columns": self.columns, "targets": self.target_names, "scaler": self.scaler.state()}

    def train_state(self) -> dict[str, Any]:
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ training
    def windows_at(self, values: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (N, L, C) and targets (N, H, len(targets)) of the windows starting at ``starts``."""
        d = self.cfg.data
        w = gather_windows(values, starts, d.input_length, d.horizon)
        return w[:, : d.input_length], w[:, d.input_length:, self.targets]

    def train_batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        starts = self.windows["train"]
        order = starts[torch.randperm(len(starts), generator=g).to(starts.device)]
        return list(order.split(self.cfg.train.batch_size))

    def train_step(self, starts: torch.Tensor, index: int, step: int) -> StepResult:
        x, y = self.windows_at(self.values, starts)
        recurrent = self.cfg.model.decoder == "recurrent"
        ratio = self.teacher_forcing(step) if recurrent else 0.0
        pred = self.model(x, y, ratio).float()
        loss = F.mse_loss(pred, y) if self.cfg.model.loss == "mse" else F.l1_loss(pred, y)
        return StepResult(loss, len(starts), {"teacher_forcing": ratio} if recurrent else None)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def score(self, values: torch.Tensor, starts: torch.Tensor, batch_size: int,
              baselines_in_original: bool = False) -> dict[str, float]:
        """MSE and MAE of the model and of both baselines over the windows at ``starts``:
        standardised (the literature's figures) and, for the model, in original units."""
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        for chunk in starts.split(batch_size):
            x, y = self.windows_at(values, chunk)
            guesses = {"": self.model(x).float(),
                       "last_value_": x[:, -1:, self.targets].expand_as(y),
                       "seasonal_": x[:, self.season_at][..., self.targets]}
            y_original = self.scaler.inverse(y, self.targets)
            for name, pred in guesses.items():
                errors = {"": pred - y}
                if name == "" or baselines_in_original:
                    errors["_original"] = self.scaler.inverse(pred, self.targets) - y_original
                for suffix, err in errors.items():
                    for metric, value in (("mse", err.pow(2).sum()), ("mae", err.abs().sum())):
                        key = f"{name}{metric}{suffix}"
                        sums[key] = sums.get(key, 0.0) + float(value)
        self.model.train(was_training)
        count = max(1, len(starts) * self.cfg.data.horizon * len(self.targets))
        results = {k: v / count for k, v in sums.items()}
        return {"loss": results[self.cfg.model.loss], **results, "windows": len(starts)}

    def evaluate(self) -> dict[str, float]:
        results = self.score(self.values, self.windows["valid"], self.cfg.train.eval_batch_size)
        results.pop("windows")
        return results

    def file_windows(self, path: str, split: str | None) -> tuple[Series, torch.Tensor]:
        """A file's rows and the windows to score: all of them, or those of one split of the
        config's ``data.split`` applied to this file."""
        series = self.read(path, self.columns)
        d = self.cfg.data
        first, end = 0, len(series)
        if split is not None:
            first, end = split_rows(d.split, len(series), path)[SPLITS.index(split)]
        starts = window_starts(first, end, d.input_length, d.horizon)
        if len(starts) == 0:
            raise DataError(f"{path}: rows [{first}, {end}) hold no whole window of {d.input_length} input "
                            f"and {d.horizon} target rows")
        return series, starts.to(self.device)

    def evaluate_file(self, path: str, batch_size: int, split: str | None = None) -> dict[str, Any]:
        series, starts = self.file_windows(path, split)
        results = self.score(self.standardised(series), starts, batch_size, baselines_in_original=True)
        return {**results, "rows": f"[{int(starts[0])}, {int(starts[-1]) + self.cfg.data.horizon})"}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forecast(self, series: Series, starts: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Forecasts in original units, (n, H, len(targets)) per chunk of ``starts`` (a start may be
        the file's end: a forecast of the rows after it)."""
        values = self.standardised(series)
        for chunk in starts.split(batch_size):
            x = gather_windows(values, chunk.to(self.device), self.cfg.data.input_length, 0)
            yield self.scaler.inverse(self.model(x).double(), self.targets).cpu()

    def forecast_windows(self, path: str, at: int | None = None, every: bool = False) -> tuple[Series, torch.Tensor]:
        """The series in ``path`` and the windows' starts to forecast: the one at row ``at``
        (default: after the file's end), or ``every`` window the file holds."""
        if every and at is not None:
            raise ConfigError("", "--at and --every choose the windows two ways; give one")
        series = self.read(path, self.columns)
        length, n = self.cfg.data.input_length, len(series)
        if every:
            return series, torch.arange(length, n + 1)
        at = n if at is None else at
        if not length <= at <= n:
            raise ConfigError("", f"--at {at}: needs {length} rows before it (input_length) and at most the "
                                  f"file's {n} rows")
        return series, torch.tensor([at])

    def forecast_file(self, path: str, at: int | None = None, every: bool = False,
                      batch_size: int = 64) -> list[list[Any]]:
        """:meth:`predict_rows` of :meth:`forecast_windows`."""
        series, starts = self.forecast_windows(path, at, every)
        return list(self.predict_rows(series, starts, batch_size))

    def predict_rows(self, series: Series, starts: torch.Tensor, batch_size: int) -> Iterator[list[Any]]:
        """CSV rows (origin, timestamp, step, column, value, truth) for the windows at ``starts``;
        truth is empty past the file's last row, whose timestamps continue the last time step."""
        times, n, step = series.times, len(series), series.step()
        truth = series.values

        def when(row: int) -> datetime:
            return times[row] if row < n else times[-1] + step * (row - n + 1)

        done = 0
        for block in self.forecast(series, starts, batch_size):
            for w in range(block.size(0)):
                t = int(starts[done + w])
                origin = times[t - 1]
                for k in range(block.size(1)):
                    for j, col in enumerate(self.target_names):
                        real = format(float(truth[t + k, self.targets[j]]), ".10g") if t + k < n else ""
                        yield [origin, when(t + k), k + 1, col, format(float(block[w, k, j]), ".10g"), real]
            done += block.size(0)


def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> ForecastTask:
    return ForecastTask(cfg, device, extras, with_data)
