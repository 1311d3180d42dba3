"""A search space: config keys and their ranges or choices, checked against the config
schema before any trial runs.

    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    model.dropout: {low: 0.1, high: 0.6}
    model.num_layers: {choices: [1, 2, 3]}
    model.hidden_size: {low: 64, high: 512, step: 64}
    model.cell: {choices: [lstm, gru]}

A range on an integer key samples integers; ``step`` makes a range a grid (and is what the
grid sampler needs); ``log`` samples evenly in the logarithm.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from rnnkit.config import Config, ConfigError, load_config

RANGE_KEYS = {"low", "high", "log", "step"}


class Param(NamedTuple):
    key: str                            # dotted config key
    kind: str                           # "float", "int" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        """Every value of a choice or a stepped range (the grid sampler's axis)."""
        if self.kind == "choice":
            return list(self.choices)
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in values] if self.kind == "int" else [round(v, 12) for v in values]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}: one of {', '.join(map(_value_text, self.choices))}"
        how = ", log" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{self.key}: {self.kind} in [{self.low:g}, {self.high:g}]{how}"


def _numeric(tp: Any) -> str | None:
    """'int' or 'float' for a numeric key (optional or not), None for any other."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if optional else [tp]
    if len(args) == 1 and args[0] is int:
        return "int"
    if len(args) == 1 and args[0] is float:
        return "float"
    return None


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _check_value(config: Path, key: str, value: Any) -> None:
    """The config with ``key`` set to ``value`` must load: the config's own one-line error
    (with its did-you-mean for an unknown key) otherwise."""
    load_config(config, [f"{key}={_value_text(value)}"])


def read_space(path: Path, config: Path, sampler: str = "tpe") -> list[Param]:
    """The checked parameters of the search space in ``path`` for ``config``."""
    where = str(path)
    if not path.is_file():
        raise ConfigError("", f"search space not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError("", "is not valid YAML", where) from None
    except UnicodeDecodeError as err:
        raise ConfigError("", f"is not UTF-8 text (byte {err.start}); a search space is a YAML file", where) from None
    except OSError as err:
        raise ConfigError("", f"cannot be read ({err.strerror})", where) from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("", "must map config keys to ranges or choices, e.g. 'train.lr: {low: 1e-4, high: 1e-2, "
                              "log: true}'", where)
    cfg = load_config(config)
    params = []
    for key, spec in raw.items():
        key = str(key)
        if key in ("task", "run_dir"):
            raise ConfigError(key, "is fixed in a sweep (each trial has its own run folder in the study's)", where)
        try:
            tp = _known(cfg, config, key)
        except ConfigError as err:
            raise ConfigError(err.key, err.message, where) from None
        params.append(_param(key, spec, tp, config, where))
        if sampler == "grid" and params[-1].kind != "choice" and params[-1].step is None:
            raise ConfigError(key, "the grid sampler needs every range to have a step (or choices)", where)
    return params


def _known(cfg: Config, config: Path, key: str) -> Any:
    """The declared type of ``key``; an unknown key gets the config's own one-line error, with
    its did-you-mean."""
    node: Any = cfg
    tp: Any = None
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            load_config(config, [f"{key}=null"])       # raises: unknown key (did you mean ...?)
            raise ConfigError(key, "is not a key of this config")
        tp = typing.get_type_hints(type(node))[part]
        node = getattr(node, part)
    if dataclasses.is_dataclass(node):
        first = dataclasses.fields(node)[0].name
        raise ConfigError(key, f"is a section; a sweep sets single keys (e.g. {key}.{first})")
    return tp


def _param(key: str, spec: Any, tp: Any, config: Path, where: str) -> Param:
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(key, f"expected {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}", where)
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        if extra:
            raise ConfigError(key, f"choices take no {', '.join(sorted(extra))}", where)
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(key, "choices must be a non-empty list", where)
        for c in choices:
            if not isinstance(c, (str, int, float, bool, type(None))):
                raise ConfigError(key, f"a choice must be a single value, got {c!r}", where)
            try:
                _check_value(config, key, c)
            except ConfigError as err:
                raise ConfigError(key, f"the choice {c!r} is refused by the config: {err.message}", where) from None
        return Param(key, "choice", choices=tuple(choices))
    unknown = set(spec) - RANGE_KEYS
    if unknown:
        raise ConfigError(key, f"unknown {', '.join(sorted(unknown))}; a range takes low, high, log and step, a "
                               f"choice takes choices", where)
    kind = _numeric(tp)
    if kind is None:
        raise ConfigError(key, "is not a number, so it takes {choices: [..]}, not a range", where)
    if "low" not in spec or "high" not in spec:
        raise ConfigError(key, "a range needs both low and high", where)
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(key, f"{name} must be a number, got {v!r}", where)
        if kind == "int" and v is not None and not float(v).is_integer():
            raise ConfigError(key, f"is an integer key; {name} {v!r} is not an integer", where)
    if not low < high:
        raise ConfigError(key, f"low ({low}) must be below high ({high})", where)
    if log and low <= 0:
        raise ConfigError(key, "a log range needs low above 0", where)
    if log and step is not None:
        raise ConfigError(key, "a range is either log or stepped, not both", where)
    if step is not None and step <= 0:
        raise ConfigError(key, "step must be above 0", where)
    for end in (low, high):
        try:
            _check_value(config, key, int(end) if kind == "int" else float(end))
        except ConfigError as err:
            raise ConfigError(key, f"the range end {end} is refused by the config: {err.message}", where) from None
    return Param(key, kind, float(low), float(high), log, None if step is None else float(step))


def overrides(params: list[Param], values: dict[str, Any]) -> list[str]:
    """``--set`` overrides for a trial's sampled values."""
    return [f"{p.key}={_value_text(values[p.key])}" for p in params]
