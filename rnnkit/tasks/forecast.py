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

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rnnkit.config import Config, ConfigError
from rnnkit.config.forecast import DataConfig, ModelConfig  # noqa: F401  (this task's sections)
from rnnkit.data.series import Scaler, Series, gather_windows, split_rows, window_starts
from rnnkit.tasks.forecast_text import SPLITS, ForecastText
from rnnkit.data.vocab import DataError
from rnnkit.models.forecast import Forecaster
from rnnkit.training.teacher_forcing import TeacherForcingSchedule
from rnnkit.training.interface import StepResult



class ForecastTask(ForecastText):
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
        if self.series is not None:
            self.values = self.standardised(self.series)
            self.windows = {}
            for name, (first, end) in zip(SPLITS, self.bounds):
                self.windows[name] = torch.from_numpy(window_starts(first, end, d.input_length, d.horizon)).to(device)
            for name in ("train", "valid"):
                if len(self.windows[name]) == 0:
                    first, end = self.bounds[SPLITS.index(name)]
                    raise DataError(f"{d.path}: the {name} rows [{first}, {end}) hold no whole window of "
                                    f"{d.input_length} input and {d.horizon} target rows; change data.split, "
                                    f"data.input_length or data.horizon")

    def standardised(self, series: Series) -> torch.Tensor:
        return torch.from_numpy(self.standardised_values(series)).to(self.device)

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

    # ------------------------------------------------------------------ evaluation and inference
    def evaluate(self) -> dict[str, float]:
        results = self.score(self.values, self.windows["valid"], self.cfg.train.eval_batch_size)
        results.pop("windows")
        return results

    @torch.no_grad()
    def predict_windows(self, x: np.ndarray) -> np.ndarray:
        """The backend interface of :class:`ForecastText`: standardised forecasts (N, H, T) of
        standardised windows (N, L, C)."""
        was_training = self.model.training
        self.model.eval()
        out = self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()
        self.model.train(was_training)
        return out

def build(cfg: Config, device: torch.device, extras: dict[str, Any] | None = None,
          with_data: bool = True) -> ForecastTask:
    return ForecastTask(cfg, device, extras, with_data)
