"""The config of ``task: forecast``: multivariate time series, the next ``horizon`` rows."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rnnkit.config.core import (MAX_DIM, MAX_LAYERS, Config, ConfigError, RecurrentConfig, check_metric,
                                check_recurrent, num, require_file)

METRICS = ("valid_loss", "valid_mse", "valid_mae")


@dataclass
class DataConfig:
    """A CSV file of numeric columns, its splits and the windows the model reads and forecasts."""

    path: Optional[str] = None
    """A CSV file: a time column and numeric columns."""
    time_column: str = "date"
    """The time column's name (not a model input)."""
    inputs: Optional[list[str]] = None
    """Columns the model reads; null: all but the time column."""
    targets: Optional[list[str]] = None
    """Columns it forecasts, among the inputs; null: all inputs."""
    split: list[float] = field(default_factory=lambda: [0.7, 0.8, 1.0])
    """The ends of train, validation and test: row numbers, or fractions of the file when all are <= 1."""
    input_length: int = num(96, 1)
    """L: the rows the model sees."""
    horizon: int = num(96, 1)
    """H: the rows it forecasts."""
    season: int = num(24, 1)
    """The seasonal baseline's period (24 for hourly data)."""


@dataclass
class ModelConfig(RecurrentConfig):
    """A recurrent encoder over segments of the series and a direct or recurrent decoder."""

    cell: Literal["rnn_tanh", "rnn_relu", "lstm", "gru", "mingru", "minlstm", "rglru", "slstm", "mlstm"] = "gru"
    """The recurrent cell: Elman RNN with tanh or ReLU, LSTM or GRU; a scan cell, `mingru`, `minlstm` or `rglru`; or xLSTM's `slstm` or `mlstm` (see the Cells guide)."""
    hidden_size: int = num(256, 1, MAX_DIM)
    """Units per recurrent layer."""
    num_layers: int = num(1, 1, MAX_LAYERS)
    """Recurrent layers stacked."""
    dropout: float = num(0.0, 0, 1, hi_open=True)
    """Between layers and before the head."""
    segment: int = num(1, 1)
    """Rows per recurrent step (must divide `data.input_length`; SegRNN's segments)."""
    channels: Literal["independent", "joint"] = "independent"
    """`independent`: one shared model reads each column alone; `joint`: all columns in one vector per step."""
    instance_norm: Literal["none", "last", "mean_std"] = "last"
    """Normalise each window: subtract its last value, or its mean and divide by its deviation; added back after."""
    decoder: Literal["direct", "recurrent"] = "direct"
    """`direct`: the whole horizon from the last state; `recurrent`: segment by segment (`train.teacher_forcing` applies)."""
    loss: Literal["mse", "mae"] = "mse"
    """The training loss."""


def check_config(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    check_recurrent(m, "model")
    check_metric(cfg, METRICS)
    require_file("data.path", d.path)
    s = d.split
    fractions = max(s, default=0) <= 1
    if len(s) != 3 or s[0] <= 0 or not s[0] < s[1] < s[2] \
            or (not fractions and any(b != int(b) for b in s)):
        raise ConfigError("data.split", f"expected the ends of train, validation and test, increasing: row "
                                        f"numbers [8640, 11520, 14400] or fractions [0.7, 0.8, 1.0]; got {s!r}")
    if d.input_length % m.segment:
        raise ConfigError("model.segment", f"{m.segment} must divide data.input_length ({d.input_length})")
    if d.season > d.input_length:
        raise ConfigError("data.season", f"the seasonal baseline looks {d.season} rows back; "
                                         f"needs data.input_length >= {d.season}")
    if d.inputs is not None and d.targets is not None:
        outside = [t for t in d.targets if t not in d.inputs]
        if outside:
            raise ConfigError("data.targets", f"{outside[0]!r} is not among data.inputs; the model forecasts "
                                              f"columns it reads")
    for key in ("inputs", "targets"):
        names = getattr(d, key)
        if names is not None and (not names or len(set(names)) != len(names)):
            raise ConfigError(f"data.{key}", f"expected a non-empty list of distinct column names, got {names!r}")
