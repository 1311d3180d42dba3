"""Time series from CSV files: reading with row-and-column errors, splits in time order,
standardisation fitted on training rows, and forecast windows.

A window is named by its first target row ``t``: its inputs are rows ``[t - L, t)`` and its
targets rows ``[t, t + H)``. A split owns the windows whose targets lie inside it; their inputs
may reach back into the rows before it, never a target past its end.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

import numpy as np

from rnnkit.data.vocab import DataError

MISSING = {"", "na", "nan", "null", "none", "n/a", "?"}


@dataclass
class Series:
    """Numeric columns of one CSV file, rows in time order."""

    path: str
    times: list[datetime]
    columns: list[str]
    values: np.ndarray       # (rows, columns), float64

    def __len__(self) -> int:
        return len(self.times)

    def step(self) -> timedelta:
        """The spacing of the last two timestamps (how far one forecast step reaches)."""
        if len(self.times) < 2:
            raise DataError(f"{self.path}: needs at least two rows to tell the time step")
        return self.times[-1] - self.times[-2]


def _where(path: str, row: int, column: str | None = None) -> str:
    col = f", column {column}" if column is not None else ""
    return f"{path}: row {row} (line {row + 2}){col}"


def _parse_time(text: str, path: str, row: int, column: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise DataError(f"{_where(path, row, column)}: {text!r} is not a timestamp "
                        f"(expected ISO 8601, e.g. 2016-07-01 00:00:00)") from None


def _parse_value(text: str, path: str, row: int, column: str) -> float:
    if text.strip().lower() in MISSING:
        raise DataError(f"{_where(path, row, column)}: missing value")
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{_where(path, row, column)}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{_where(path, row, column)}: {text!r} is not a finite number")
    return v


def read_series(path: str | Path, time_column: str, columns: Sequence[str] | None = None) -> Series:
    """Read ``time_column`` and the numeric ``columns`` (all others when None) of a CSV file.

    Missing or non-numeric cells, unparseable, duplicate or unsorted timestamps, and rows of
    the wrong width are :class:`DataError` naming the file, the row and the column.
    """
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: is not UTF-8 text") from None
    except csv.Error as err:
        raise DataError(f"{path}: is not a readable CSV file ({err})") from None
    if not rows:
        raise DataError(f"{path}: is empty (expected a header line, then one row per time step)")
    header = [h.strip() for h in rows[0]]
    if time_column not in header:
        raise DataError(f"{path}: no time column {time_column!r} in the header (columns: {', '.join(header)})")
    names = list(columns) if columns is not None else [h for h in header if h != time_column]
    missing = [c for c in names if c not in header]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} in the header (columns: {', '.join(header)})")
    if not names:
        raise DataError(f"{path}: has no columns besides the time column {time_column!r}")
    t_at, at = header.index(time_column), [header.index(c) for c in names]
    times: list[datetime] = []
    values: list[list[float]] = []
    for r, fields in enumerate(rows[1:]):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            raise DataError(f"{_where(path, r)}: empty line")
        if len(fields) != len(header):
            raise DataError(f"{_where(path, r)}: {len(fields)} fields, the header has {len(header)}")
        t = _parse_time(fields[t_at], path, r, time_column)
        if times and t <= times[-1]:
            what = "duplicates" if t == times[-1] else "comes before"
            raise DataError(f"{_where(path, r, time_column)}: timestamp {t} {what} the previous row's "
                            f"({times[-1]}); rows must be in strictly increasing time order")
        times.append(t)
        values.append([_parse_value(fields[i], path, r, name) for i, name in zip(at, names)])
    if not times:
        raise DataError(f"{path}: has a header but no rows")
    return Series(path, times, names, np.asarray(values, dtype=np.float64).reshape(len(times), len(names)))


def split_rows(bounds: Sequence[float], rows: int, path: str) -> list[tuple[int, int]]:
    """Train, validation and test row ranges from their ends: row numbers, or fractions of the
    file when every bound is at most 1 (``[0.7, 0.8, 1.0]``)."""
    ends = [round(b * rows) for b in bounds] if max(bounds) <= 1 else [int(b) for b in bounds]
    if ends[-1] > rows:
        raise DataError(f"{path}: has {rows} rows, but data.split reaches row {ends[-1]}")
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def window_starts(first: int, end: int, input_length: int, horizon: int) -> np.ndarray:
    """First target rows of every window whose targets lie in ``[first, end)`` and whose inputs
    lie in the file (they may reach back before ``first``)."""
    return np.arange(max(first, input_length), end - horizon + 1, dtype=np.int64)


def gather_windows(values, starts, before: int, after: int):
    """Rows ``[t - before, t + after)`` of ``values`` (rows, C) for each ``t`` in ``starts``:
    (len(starts), before + after, C). numpy arrays or torch tensors (on any device) alike."""
    offsets = range(-before, after)
    offsets = starts.new_tensor(list(offsets)) if hasattr(starts, "new_tensor") else np.asarray(offsets)
    return values[starts[:, None] + offsets[None, :]]


def _like(array: np.ndarray, x):
    """``array`` as ``x``'s kind: a torch tensor of its dtype and device, or a numpy array."""
    return x.new_tensor(array) if hasattr(x, "new_tensor") else array


@dataclass
class Scaler:
    """Per-column standardisation: (x - mean) / std, the statistics of the training rows. It
    transforms numpy arrays and torch tensors alike."""

    mean: np.ndarray     # (C,) float64
    std: np.ndarray      # (C,)

    @classmethod
    def fit(cls, values: np.ndarray) -> "Scaler":
        """Mean and population standard deviation (a constant column keeps std 1)."""
        std = values.std(0)
        return cls(values.mean(0), np.where(std > 0, std, 1.0))

    def transform(self, x):
        return (x - _like(self.mean, x)) / _like(self.std, x)

    def inverse(self, x, columns: Sequence[int] | None = None):
        mean, std = (self.mean, self.std) if columns is None else (self.mean[list(columns)], self.std[list(columns)])
        return x * _like(std, x) + _like(mean, x)

    def state(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list[float]]) -> "Scaler":
        return cls(np.asarray(state["mean"], dtype=np.float64), np.asarray(state["std"], dtype=np.float64))
