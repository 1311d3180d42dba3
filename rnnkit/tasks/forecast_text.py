"""What a forecaster does with a series, whatever runs its arithmetic: reading CSV files,
choosing windows, scoring against the baselines and writing forecasts in original units. The
torch task and the onnxruntime runtime share it (it imports neither; numpy arrays throughout).

A class that mixes it in has ``cfg``, ``columns``, ``target_names``, ``targets`` (their
positions), ``scaler`` and ``predict_windows(x) -> (N, H, len(targets))``, the standardised
forecasts of standardised input windows ``x`` (N, L, C), float32.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterator

import numpy as np

from rnnkit.config import ConfigError
from rnnkit.data.series import Series, gather_windows, read_series, split_rows, window_starts
from rnnkit.data.vocab import DataError
from rnnkit.decoding.streams import ForecastStreams

SPLITS = ("train", "valid", "test")


def seasonal_positions(input_length: int, horizon: int, season: int) -> np.ndarray:
    """Where in the input window the seasonal baseline finds each horizon step's value: step k
    repeats the row one season (or as many whole seasons as it takes) before it."""
    k = np.arange(horizon)
    return input_length + k - season * (k // season + 1)


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor (on any device) or an array as a numpy array."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class ForecastText:
    cfg: Any
    columns: list[str]
    target_names: list[str]
    targets: list[int]
    scaler: Any

    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def streams(self, max_rows: int = 100_000) -> ForecastStreams:
        """Many series fed rows as they arrive, forecast together (:class:`ForecastStreams`)."""
        return ForecastStreams(self, max_rows)

    def read(self, path: str, columns: list[str] | None) -> Series:
        series = read_series(path, self.cfg.data.time_column, columns)
        need = self.cfg.data.input_length + 1
        if len(series) < need:
            raise DataError(f"{path}: has {len(series)} rows; a window needs at least {need}")
        return series

    def standardised_values(self, series: Series) -> np.ndarray:
        return self.scaler.transform(series.values).astype(np.float32)

    def score(self, values: Any, starts: Any, batch_size: int, baselines_in_original: bool = False
              ) -> dict[str, float]:
        """MSE and MAE of the model and of both baselines over the windows at ``starts``:
        standardised (the literature's figures) and, for the model, in original units."""
        values, starts = _numpy(values), _numpy(starts)
        d = self.cfg.data
        season_at = seasonal_positions(d.input_length, d.horizon, d.season)
        sums: dict[str, float] = {}
        for first in range(0, len(starts), batch_size):
            w = gather_windows(values, starts[first:first + batch_size], d.input_length, d.horizon)
            x, y = w[:, : d.input_length], w[:, d.input_length:][..., self.targets].astype(np.float64)
            guesses = {"": self.predict_windows(np.ascontiguousarray(x)).astype(np.float64),
                       "last_value_": np.broadcast_to(x[:, -1:][..., self.targets], y.shape).astype(np.float64),
                       "seasonal_": x[:, season_at][..., self.targets].astype(np.float64)}
            y_original = self.scaler.inverse(y, self.targets)
            for name, pred in guesses.items():
                errors = {"": pred - y}
                if name == "" or baselines_in_original:
                    errors["_original"] = self.scaler.inverse(pred, self.targets) - y_original
                for suffix, err in errors.items():
                    for metric, value in (("mse", np.square(err).sum()), ("mae", np.abs(err).sum())):
                        key = f"{name}{metric}{suffix}"
                        sums[key] = sums.get(key, 0.0) + float(value)
        count = max(1, len(starts) * d.horizon * len(self.targets))
        results = {k: v / count for k, v in sums.items()}
        return {"loss": results[self.cfg.model.loss], **results, "windows": len(starts)}

    def file_windows(self, path: str, split: str | None) -> tuple[Series, np.ndarray]:
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
        return series, starts

    def evaluate_file(self, path: str, batch_size: int, split: str | None = None) -> dict[str, Any]:
        series, starts = self.file_windows(path, split)
        results = self.score(self.standardised_values(series), starts, batch_size, baselines_in_original=True)
        return {**results, "rows": f"[{int(starts[0])}, {int(starts[-1]) + self.cfg.data.horizon})"}

    def forecast(self, series: Series, starts: Any, batch_size: int) -> Iterator[np.ndarray]:
        """Forecasts in original units, (n, H, len(targets)) per chunk of ``starts`` (a start may be
        the file's end: a forecast of the rows after it)."""
        values, starts = self.standardised_values(series), _numpy(starts)
        for first in range(0, len(starts), batch_size):
            x = gather_windows(values, starts[first:first + batch_size], self.cfg.data.input_length, 0)
            yield self.scaler.inverse(self.predict_windows(np.ascontiguousarray(x)).astype(np.float64),
                                      self.targets)

    def forecast_windows(self, path: str, at: int | None = None, every: bool = False) -> tuple[Series, np.ndarray]:
        """The series in ``path`` and the windows' starts to forecast: the one at row ``at``
        (default: after the file's end), or ``every`` window the file holds."""
        if every and at is not None:
            raise ConfigError("", "--at and --every choose the windows two ways; give one")
        series = self.read(path, self.columns)
        length, n = self.cfg.data.input_length, len(series)
        if every:
            return series, np.arange(length, n + 1)
        at = n if at is None else at
        if not length <= at <= n:
            raise ConfigError("", f"--at {at}: needs {length} rows before it (input_length) and at most the "
                                  f"file's {n} rows")
        return series, np.asarray([at])

    def forecast_file(self, path: str, at: int | None = None, every: bool = False,
                      batch_size: int = 64) -> list[list[Any]]:
        """:meth:`predict_rows` of :meth:`forecast_windows`."""
        series, starts = self.forecast_windows(path, at, every)
        return list(self.predict_rows(series, starts, batch_size))

    def predict_rows(self, series: Series, starts: Any, batch_size: int) -> Iterator[list[Any]]:
        """CSV rows (origin, timestamp, step, column, value, truth) for the windows at ``starts``;
        truth is empty past the file's last row, whose timestamps continue the last time step."""
        times, n, step = series.times, len(series), series.step()
        truth, starts = series.values, _numpy(starts)

        def when(row: int) -> datetime:
            return times[row] if row < n else times[-1] + step * (row - n + 1)

        done = 0
        for block in self.forecast(series, starts, batch_size):
            for w in range(block.shape[0]):
                t = int(starts[done + w])
                origin = times[t - 1]
                for k in range(block.shape[1]):
                    for j, col in enumerate(self.target_names):
                        real = format(float(truth[t + k, self.targets[j]]), ".10g") if t + k < n else ""
                        yield [origin, when(t + k), k + 1, col, format(float(block[w, k, j]), ".10g"), real]
            done += block.shape[0]
