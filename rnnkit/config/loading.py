"""YAML files and ``--set`` overrides become validated dataclasses.

Field types drive parsing (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``,
``Literal[...]``, ``list[...]``). Anything wrong raises :class:`ConfigError`, whose message
names the file, the dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rnnkit.config.core import DEVICE_PATTERN, Config, ConfigError, describe_range
from rnnkit.config.tasks import task_names, task_schema


_DEVICE = re.compile(DEVICE_PATTERN)


# --------------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Turn a mapping into dataclass ``cls``, checking keys, types and ranges."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix, f"expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{prefix}.{k}" if prefix else str(k), f"unknown key{hint}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build_section(tp, raw[name], key)
            continue
        v = _coerce(raw[name], tp, key)
        rng = f.metadata.get("range")
        if rng and v is not None:
            lo, hi, lo_open, hi_open = rng
            too_low = lo is not None and (v <= lo if lo_open else v < lo)
            too_high = hi is not None and (v >= hi if hi_open else v > hi)
            if too_low or too_high:
                raise ConfigError(key, f"{v!r} is out of range; allowed: {describe_range(*rng)}")
        values[name] = v
    return cls(**values)


def _parse_override(text: str) -> tuple[str, Any, str]:
    if "=" not in text:
        raise ConfigError("", f"--set expects dotted.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"--set expects dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML reads '3e-4' as text; a number is meant
        for parse in (int, float):
            try:
                value = parse(value)
                break
            except ValueError:
                pass
    return key, value, raw


def _apply_override(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


def _string_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys whose type is plain ``str`` (a --set value there stays verbatim)."""
    out = set()
    for name, tp in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if tp is str or tp == Optional[str]:
            out.add(key)
        elif dataclasses.is_dataclass(tp):
            out |= _string_keys(tp, key + ".")
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Load a YAML file (or a ``base`` dict, e.g. from a checkpoint), apply overrides, validate."""
    source = str(path) if path is not None else "checkpoint config"
    if base is not None:
        tree = yaml.safe_load(yaml.safe_dump(base))  # a deep copy of plain data
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("", f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError("", f"is not valid YAML{where}", source) from None
        except UnicodeDecodeError:
            raise ConfigError("", "is not UTF-8 text", source) from None
        tree = tree or {}
        if not isinstance(tree, dict):
            raise ConfigError("", "must be a mapping of sections (task, data, model, train)", source)

    set_keys: dict[str, str] = {}
    try:
        parsed = [_parse_override(o) for o in overrides]
        task = tree.get("task", Config.task)
        for key, value, raw in parsed:
            if key == "task":
                task = value
        if task not in task_names():
            raise ConfigError("task", f"expected one of {', '.join(map(repr, task_names()))}, got {task!r}")
        schema = task_schema(task)
        data_cls, model_cls = schema.data, schema.model
        text_keys = _string_keys(Config) | {f"data.{k}" for k in _string_keys(data_cls)} \
            | {f"model.{k}" for k in _string_keys(model_cls)}
        for key, value, raw in parsed:
            _apply_override(tree, key, raw if key in text_keys and value is not None else value)   # null unsets
            set_keys[key] = raw
        cfg = _build(tree, data_cls, model_cls)
        _check(cfg, with_task=base is None)
    except ConfigError as err:
        hit = next((k for k in set_keys if err.key and (err.key == k or err.key.startswith(k + ".")
                                                         or k.startswith(err.key + "."))), None)
        err.source = f"{source} (--set {hit}={set_keys[hit]})" if hit else source
        raise ConfigError(err.key, err.message, err.source) from None
    return cfg


def _build(tree: dict, data_cls: type, model_cls: type) -> Config:
    sections = {"data": data_cls, "model": model_cls}
    top = {k: v for k, v in tree.items() if k not in sections}
    cfg = build_section(Config, top, "")
    cfg.data = build_section(data_cls, tree.get("data"), "data")
    cfg.model = build_section(model_cls, tree.get("model"), "model")
    return cfg


def _check(cfg: Config, with_task: bool = True) -> None:
    """Cross-field rules: those of the training loop, then the task's own (files included)."""
    t = cfg.train
    if not _DEVICE.match(t.device):
        raise ConfigError("train.device", f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {t.device!r}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError("train.betas", f"expected two numbers in [0, 1), got {t.betas!r}")
    if t.lr_schedule in ("cosine", "slanted_triangular") and t.warmup_steps >= t.max_steps:
        raise ConfigError("train.warmup_steps", f"{t.warmup_steps} must be below train.max_steps ({t.max_steps})")
    if t.decay_by == "budget" and t.lr_schedule not in ("cosine", "slanted_triangular"):
        raise ConfigError("train.decay_by", f"'budget' ends the decay of cosine and slanted_triangular; "
                                            f"lr_schedule is {t.lr_schedule!r}")
    if t.decay_by == "budget" and t.max_time is None:
        raise ConfigError("train.decay_by", "'budget' needs train.max_time (the decay ends at it or at max_steps)")
    if t.ema_decay is not None and t.optimizer == "nt_asgd":
        raise ConfigError("train.ema_decay", "nt_asgd averages the weights already; use one or the other")
    if (t.ar or t.tar) and not task_schema(cfg.task).activation_regularisation:
        raise ConfigError("train.ar" if t.ar else "train.tar", f"task '{cfg.task}' does not offer activation "
                                                               f"regularisation (task lm does)")
    if t.attention_penalty and cfg.task != "classification":
        raise ConfigError("train.attention_penalty", f"task '{cfg.task}' has no attention hops (task classification "
                                                     f"with model.attention_hops above 1 does)")
    if with_task:
        task_schema(cfg.task).check(cfg)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of a config (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
