"""Typed, validated configuration: YAML files and ``--set`` overrides become dataclasses.

Every section is a dataclass. Field types drive parsing (``int``, ``float``, ``bool``,
``str``, ``Optional[...]``, ``Literal[...]``, ``list[...]``); numeric bounds live in the
field metadata (see :func:`num`). Anything wrong raises :class:`ConfigError`, whose message
names the file, the dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user's configuration mistake; the CLI prints it as one line and exits with 2."""

    def __init__(self, key: str, message: str, source: str = ""):
        self.key, self.message, self.source = key, message, source
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


MAX_DIM = 65_536          # upper bounds on sizes: a typo such as hidden_size: 5120000 is an error,
MAX_LAYERS = 64           # not an allocation that takes the machine down
MAX_VOCAB = 10_000_000


def num(default: Any, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False) -> Any:
    """A numeric field with bounds; ``lo_open``/``hi_open`` exclude the bound itself."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def _describe_range(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


# --------------------------------------------------------------------------- sections
@dataclass
class RecurrentConfig:
    """A recurrent layer's cell and implementation; every task's recurrent sections extend it."""

    cell: Literal["rnn_tanh", "rnn_relu", "lstm", "gru"] = "lstm"
    impl: Literal["fused", "explicit"] = "fused"   # torch.nn's kernels, or cells from their equations
    layer_norm: bool = False                        # explicit only: layer-normalised cells
    recurrent_dropout: float = num(0.0, 0, 1, hi_open=True)   # explicit only: one mask per sequence
    residual: bool = False                          # explicit only: layers above the first add their input


RECURRENT_EXTRAS = {"layer_norm": False, "recurrent_dropout": 0.0, "residual": False}


REGULARISERS = {"weight_drop": 0.0, "locked_dropout": False}   # fused layers' options, where a task offers them


def check_recurrent(section: RecurrentConfig, prefix: str) -> None:
    """The extras need the explicit implementation, the regularisers the fused one; residual
    connections need a stack."""
    if section.impl == "explicit":
        for key, off in REGULARISERS.items():
            if getattr(section, key, off) != off:
                raise ConfigError(f"{prefix}.{key}", f"applies to fused layers ({prefix}.impl: fused); explicit "
                                                     f"cells have {prefix}.recurrent_dropout")
    if section.impl == "fused":
        for key, off in RECURRENT_EXTRAS.items():
            if getattr(section, key) != off:
                raise ConfigError(f"{prefix}.{key}", f"needs {prefix}.impl: explicit "
                                                     f"(torch.nn's fused kernels cannot do it)")
    if section.residual and getattr(section, "num_layers", 1) < 2:
        raise ConfigError(f"{prefix}.residual", f"connects stacked layers; needs {prefix}.num_layers >= 2")


def recurrent_options(section: RecurrentConfig) -> dict[str, Any]:
    """The keyword arguments ``make_rnn`` takes besides sizes (all but ``cell``)."""
    return {"impl": section.impl, **{k: getattr(section, k) for k in RECURRENT_EXTRAS},
            **{k: getattr(section, k) for k in REGULARISERS if hasattr(section, k)}}


@dataclass
class TeacherForcingConfig:
    """The probability of feeding the gold previous token (sequence-to-sequence tasks)."""

    schedule: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    start: float = num(1.0, 0, 1)
    end: float = num(0.0, 0, 1)
    steps: int = num(10000, 1)   # the decay's length in training steps


@dataclass
class TrainConfig:
    """The shared training loop's settings (the same for every task)."""

    device: str = "auto"
    max_steps: int = num(1000, 1)
    max_time: Optional[float] = num(None, 0, lo_open=True)  # seconds; stops at whichever comes first
    batch_size: int = num(32, 1)
    eval_batch_size: int = num(32, 1)
    optimizer: Literal["sgd", "adam", "adamw", "nt_asgd"] = "adam"   # nt_asgd: SGD, then averaged (AWD-LSTM)
    nt_asgd_patience: int = num(5, 1)     # nt_asgd: average once the metric is worse than the best of the
                                          # evaluations before the last this many
    lr: float = num(0.002, 0, lo_open=True)
    momentum: float = num(0.0, 0, 1)
    weight_decay: float = num(0.0, 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["constant", "step", "plateau", "cosine", "slanted_triangular"] = "constant"
    warmup_steps: int = num(0, 0)
    lr_step_size: int = num(1000, 1)       # step: multiply by lr_gamma every lr_step_size steps
    lr_gamma: float = num(0.5, 0, 1, lo_open=True)  # step and plateau decay factor
    lr_patience: int = num(2, 0)           # plateau: evaluations without improvement before decay
    min_lr: float = num(0.0, 0)
    clip_grad_norm: Optional[float] = num(5.0, 0, lo_open=True)
    log_every: int = num(50, 1)
    eval_every: int = num(500, 1)
    metric: str = "valid_loss"
    metric_mode: Literal["min", "max"] = "min"
    early_stopping: Optional[int] = num(None, 1)  # evaluations without improvement before stopping
    num_threads: Optional[int] = num(None, 1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # bf16/fp16: autocast; fp16 adds loss scaling
    gradient_flow_every: Optional[int] = num(None, 1)   # steps between gradient-flow records in metrics.jsonl
    keep_checkpoints: int = num(0, 0)      # also keep step{N}.pt of the last this many evaluations (averaging)
    ema_decay: Optional[float] = num(None, 0, 1, lo_open=True, hi_open=True)   # evaluate and save an exponential
                                           # moving average of the weights (0.999: about the last 1,000 steps)
    tensorboard: bool = False              # also write every logged value as TensorBoard scalars
    max_nonfinite: int = num(10, 1)        # non-finite losses or gradients in a row before training stops
    stop_grace: float = num(60.0, 0, lo_open=True)   # seconds from Ctrl-C/SIGTERM to exit, last.pt saved if in time
    layer_lr_decay: Optional[float] = num(None, 0, 1, lo_open=True)  # each layer down: lr times this (ULMFiT: 1/2.6)
    unfreeze_every: Optional[int] = num(None, 1)   # gradual unfreezing: the top layer first, one more every N steps
    ar: float = num(0.0, 0)                # activation regularisation: ar * mean(h_t^2) of the top layer
    tar: float = num(0.0, 0)               # temporal AR: tar * mean((h_t - h_{t-1})^2) (tasks that say so)
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)


@dataclass
class Config:
    """A whole run: task, where it writes, seed, and the task's data/model plus training."""

    task: str = "lm"
    run_dir: str = "runs/default"
    seed: int = num(1234, 0)
    data: Any = None
    model: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


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
                raise ConfigError(key, f"{v!r} is out of range; allowed: {_describe_range(*rng)}")
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
    from rnnkit.tasks import task_schema, task_names  # tasks import config; avoid a cycle

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
        data_cls, model_cls = task_schema(task)
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
    from rnnkit.tasks import task_module

    t = cfg.train
    if not _DEVICE.match(t.device):
        raise ConfigError("train.device", f"expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {t.device!r}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError("train.betas", f"expected two numbers in [0, 1), got {t.betas!r}")
    if t.lr_schedule in ("cosine", "slanted_triangular") and t.warmup_steps >= t.max_steps:
        raise ConfigError("train.warmup_steps", f"{t.warmup_steps} must be below train.max_steps ({t.max_steps})")
    if t.ema_decay is not None and t.optimizer == "nt_asgd":
        raise ConfigError("train.ema_decay", "nt_asgd averages the weights already; use one or the other")
    if (t.ar or t.tar) and not getattr(task_module(cfg.task), "ACTIVATION_REGULARISATION", False):
        raise ConfigError("train.ar" if t.ar else "train.tar", f"task '{cfg.task}' does not offer activation "
                                                               f"regularisation (task lm does)")
    if with_task:
        task_module(cfg.task).check_config(cfg)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of a config (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def require_file(key: str, value: str | None) -> None:
    """A data path that must exist (used by tasks' ``check_config``)."""
    if value is None:
        raise ConfigError(key, "is required (a path to a text file)")
    p = Path(value)
    if not p.is_file():
        raise ConfigError(key, f"file not found: {value!r}")
