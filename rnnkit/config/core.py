"""The sections every task shares, the error type, and the helpers task schemas are built from.

Every section is a dataclass; each field's docstring (the string literal under it) is its
description in ``rnnkit schema`` and the generated reference. Numeric bounds live in the field
metadata (see :func:`num`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


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
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


def num(default: Any, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False) -> Any:
    """A numeric field with bounds; ``lo_open``/``hi_open`` exclude the bound itself."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


def describe_range(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


# --------------------------------------------------------------------------- shared sections
@dataclass
class RecurrentConfig:
    """A recurrent layer's cell and implementation; every task's recurrent sections extend it."""

    cell: Literal["rnn_tanh", "rnn_relu", "lstm", "gru", "mingru", "minlstm", "rglru", "slstm", "mlstm"] = "lstm"
    """The recurrent cell: Elman RNN with tanh or ReLU, LSTM or GRU; a cell whose recurrence is linear and trains as one parallel scan over the sequence: `mingru` and `minlstm` (Feng et al. 2024), `rglru` (De et al. 2024, Griffin's RG-LRU); or xLSTM's cells (Beck et al. 2024): `mlstm` (a matrix memory per head, trained a chunk of positions at a time) and `slstm` (exponential gating with memory mixing within heads, sequential). See the Cells guide."""
    impl: Literal["fused", "explicit"] = "fused"
    """`fused`: torch.nn's kernels (cuDNN on GPU, oneDNN on CPU); `explicit`: cells written from their equations, with the same parameter names, so a checkpoint moves between the two. Classic cells only: `mingru`, `minlstm`, `rglru`, `slstm` and `mlstm` have one implementation each."""
    layer_norm: bool = False
    """Explicit cells: layer-normalised gates (Ba et al. 2016), and an LSTM's cell state before its tanh. Scan cells: each layer's input layer-normalised first (pre-norm)."""
    recurrent_dropout: float = num(0.0, 0, 1, hi_open=True)
    """Explicit cells only: variational dropout on the recurrent state, one mask per sequence for all its steps."""
    residual: bool = False
    """Explicit and scan cells: layers above the first add their input to their output (needs two layers or more)."""
    block: bool = False
    """Each layer is the block the cell's paper builds around it, instead of the bare cell. `rglru`: Hawk's recurrent block (De et al. 2024): a GeLU gate branch, and a branch of a linear map and a causal depthwise convolution of width 4 feeding the RG-LRU; their product projected back. `mlstm`: xLSTM's mLSTM block (Beck et al. 2024, pre up-projection): up to twice hidden_size, a convolution of width 4 and SiLU feeding q and k, block-diagonal q/k/v projections, the mLSTM with a learned skip, gated by SiLU of a second branch, projected back down. `slstm`: xLSTM's sLSTM block (post up-projection): a convolution of width 4 and SiLU feeding the input and forget gates, per-head normalisation, then a gated GeLU feed-forward part of width 4/3 with its own residual sum. In each, the convolution's last inputs ride in the state; with `layer_norm: true` and `residual: true` the stack is the papers' pre-norm residual backbone. Not built for the other cells (an error)."""
    cell_heads: int = num(4, 1, 1024)
    """`slstm` and `mlstm`: heads of the cell's state; hidden_size must divide by it. An sLSTM mixes its memory within a head only; an mLSTM's memory is one (hidden_size / heads)-square matrix per head."""
    chrono_init: int = num(0, 0, 10_000_000)
    """`mingru` and `minlstm`: 0 keeps torch's default initialisation; T > 0 sets the gates' biases by the chrono initialisation (Tallec & Ollivier 2018) for dependencies up to T steps: each unit's decay a = 1 - 1/tau starts with tau = 1 + u, u uniform in [1, T - 1], so the units remember over time scales from 2 to T steps from the start (the default starts every decay near 1/2: a state halves at each step). Not built for the other cells (an error)."""


RECURRENT_EXTRAS = {"layer_norm": False, "recurrent_dropout": 0.0, "residual": False}


REGULARISERS = {"weight_drop": 0.0, "locked_dropout": False}   # fused layers' options, where a task offers them

SCAN_CELLS = ("mingru", "minlstm", "rglru")   # cells whose recurrence is linear: one implementation, a scan
NEW_CELLS = (*SCAN_CELLS, "slstm", "mlstm")     # the cells rnnkit stacks itself: one implementation each
CHRONO_CELLS = ("mingru", "minlstm")             # the cells chrono_init sets
BLOCK_CELLS = ("rglru", "mlstm", "slstm")        # the cells a paper builds a block around


def check_recurrent(section: RecurrentConfig, prefix: str) -> None:
    """The extras need the explicit implementation, the regularisers the fused one; residual
    connections need a stack. Scan cells take layer norm, residual connections and locked
    dropout, and nothing that acts on recurrent weights they do not have."""
    if section.residual and getattr(section, "num_layers", 1) < 2:
        raise ConfigError(f"{prefix}.residual", f"connects stacked layers; needs {prefix}.num_layers >= 2")
    if section.block and section.cell not in BLOCK_CELLS:
        raise ConfigError(f"{prefix}.block", f"is built for {', '.join(BLOCK_CELLS)} (their papers' blocks), "
                                             f"not for {section.cell}")
    if section.block and section.cell == "mlstm" and getattr(section, "hidden_size", 0) % 2:
        raise ConfigError(f"{prefix}.hidden_size", "the mLSTM block's q, k and v projections take blocks of 4 "
                                                   "of twice hidden_size: hidden_size must be even")
    if section.chrono_init and section.cell not in CHRONO_CELLS:
        raise ConfigError(f"{prefix}.chrono_init", f"sets the gates of {' and '.join(CHRONO_CELLS)}, not of "
                                                   f"{section.cell}")
    if section.chrono_init == 1:
        raise ConfigError(f"{prefix}.chrono_init", "is the longest dependency in steps: 2 or more (0: off)")
    if section.cell in NEW_CELLS:
        if section.impl != "fused":
            raise ConfigError(f"{prefix}.impl", f"{section.cell} has one implementation; impl chooses "
                                                f"between torch.nn's kernels and explicit cells for rnn_tanh, "
                                                f"rnn_relu, lstm and gru")
        why = "rnnkit's sLSTM does not offer it" if section.cell == "slstm" else \
            "its gates read the input only, so there are no recurrent weights or state inputs to drop"
        for key in ("recurrent_dropout", "weight_drop"):
            if getattr(section, key, 0.0):
                raise ConfigError(f"{prefix}.{key}", f"does not apply to {section.cell}: {why}")
        hidden = getattr(section, "hidden_size", None)
        if section.cell in ("slstm", "mlstm") and hidden is not None and hidden % section.cell_heads:
            raise ConfigError(f"{prefix}.cell_heads", f"{section.cell} splits hidden_size {hidden} into heads: "
                                                      f"{section.cell_heads} does not divide it")
        return
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


def recurrent_options(section: RecurrentConfig) -> dict[str, Any]:
    """The keyword arguments ``make_rnn`` takes besides sizes (all but ``cell``)."""
    return {"impl": section.impl, "heads": section.cell_heads, "block": section.block, "chrono": section.chrono_init,
            **{k: getattr(section, k) for k in RECURRENT_EXTRAS},
            **{k: getattr(section, k) for k in REGULARISERS if hasattr(section, k)}}


@dataclass
class TeacherForcingConfig:
    """The probability of feeding the gold previous token (sequence-to-sequence tasks)."""

    schedule: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "constant"
    """How the probability of feeding the gold previous token (translation) or segment (forecast decoder) moves from `start` to `end`: `constant` keeps `start`; the others are scheduled sampling's decays."""
    start: float = num(1.0, 0, 1)
    """The probability at step 0."""
    end: float = num(0.0, 0, 1)
    """The probability the decay ends at."""
    steps: int = num(10000, 1)
    """The decay's length in training steps."""


@dataclass
class TrainConfig:
    """The shared training loop's settings (the same for every task)."""

    device: str = field(default="auto", metadata={"pattern": DEVICE_PATTERN})
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    max_steps: int = num(1000, 1)
    """Stop after this many optimizer steps."""
    max_time: Optional[float] = num(None, 0, lo_open=True)
    """Stop after this many seconds of training; whichever of this and `max_steps` comes first."""
    batch_size: int = num(32, 1)
    """Sentences (or sequences) per training batch; for `lm`, the parallel streams the corpus is laid out in."""
    eval_batch_size: int = num(32, 1)
    """The same for evaluation."""
    optimizer: Literal["sgd", "adam", "adamw", "nt_asgd"] = "adam"
    """`sgd` (with `momentum`), `adam`, `adamw` (`betas`, `weight_decay`), or `nt_asgd`: AWD-LSTM's non-monotonically triggered averaged SGD."""
    nt_asgd_patience: int = num(5, 1)
    """`nt_asgd`: start averaging once the metric is worse than the best of the evaluations before the last this many."""
    lr: float = num(0.002, 0, lo_open=True)
    """The learning rate (the peak one under a schedule)."""
    momentum: float = num(0.0, 0, 1)
    """`sgd`'s momentum."""
    weight_decay: float = num(0.0, 0)
    """L2 penalty (`adamw`: decoupled weight decay)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's two moment decays, each in [0, 1)."""
    lr_schedule: Literal["constant", "step", "plateau", "cosine", "slanted_triangular"] = "constant"
    """`constant`; `step` (times `lr_gamma` every `lr_step_size` steps); `plateau` (times `lr_gamma` after `lr_patience` evaluations without improvement); `cosine` (to `min_lr` at `max_steps`); `slanted_triangular` (ULMFiT's short rise and long fall)."""
    warmup_steps: int = num(0, 0)
    """Steps of linear warm-up before the schedule."""
    lr_step_size: int = num(1000, 1)
    """`step`: steps between decays."""
    lr_gamma: float = num(0.5, 0, 1, lo_open=True)
    """`step` and `plateau`: the factor each decay multiplies the learning rate by."""
    lr_patience: int = num(2, 0)
    """`plateau`: evaluations without improvement before a decay."""
    min_lr: float = num(0.0, 0)
    """The floor of `cosine` and `plateau`."""
    decay_by: Literal["steps", "budget"] = "steps"
    """What ends the decay of `cosine` and `slanted_triangular`: `steps` (at `max_steps`, the same rates on every machine) or `budget` (at whichever of `max_steps` and `max_time` comes first, so a run cut short by `max_time` still ends at the lowest rate; the rate then follows the clock, and a run is not repeatable step for step)."""
    clip_grad_norm: Optional[float] = num(5.0, 0, lo_open=True)
    """Clip the global gradient norm to this (logged as `grad_norm`); null turns clipping off."""
    log_every: int = num(50, 1)
    """Steps between log records in `metrics.jsonl`."""
    eval_every: int = num(500, 1)
    """Steps between evaluations (each also writes `last.pt`, and `best.pt` when the metric improves)."""
    metric: str = "valid_loss"
    """What `best.pt` and early stopping follow; each task lists the metrics it reports."""
    metric_mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher `metric` is better."""
    early_stopping: Optional[int] = num(None, 1)
    """Stop after this many evaluations without improvement; null: never."""
    num_threads: Optional[int] = num(None, 1)
    """CPU threads for torch; null: torch's default."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """`bf16`: autocast for the matrix products with fp32 master weights (CPU and CUDA); `fp16`: the same with loss scaling (CUDA); `auto`: bf16 where the device has it natively (a CPU with AVX512-BF16 or AMX, a CUDA device that supports it), else fp32."""
    gradient_flow_every: Optional[int] = num(None, 1)
    """Every this many steps, write the gradient-flow summary (decay per step, gradient norm at the loss and farthest back) into `metrics.jsonl`."""
    keep_checkpoints: int = num(0, 0)
    """Also keep `step{N}.pt` of the last this many evaluations (for `rnnkit average`)."""
    ema_decay: Optional[float] = num(None, 0, 1, lo_open=True, hi_open=True)
    """Evaluate and save an exponential moving average of the weights (0.999: about the last 1,000 steps); `last.pt` keeps the raw weights beside it. Not with `nt_asgd`."""
    tensorboard: bool = False
    """Also write every logged value as TensorBoard scalars in `run_dir/tensorboard`."""
    max_nonfinite: int = num(10, 1)
    """Non-finite losses or gradients in a row (each skips its update) before training stops."""
    stop_grace: float = num(60.0, 0, lo_open=True)
    """Seconds from Ctrl-C or SIGTERM to exit; `last.pt` is saved if that fits."""
    layer_lr_decay: Optional[float] = num(None, 0, 1, lo_open=True)
    """Discriminative fine-tuning: each layer down gets the learning rate of the one above times this (ULMFiT: 1/2.6)."""
    unfreeze_every: Optional[int] = num(None, 1)
    """Gradual unfreezing: train the top layer group first and one more every this many steps."""
    ar: float = num(0.0, 0)
    """Activation regularisation: `ar * mean(h_t^2)` of the top layer's dropped-out output, added to the loss for the gradient (task `lm`)."""
    tar: float = num(0.0, 0)
    """Temporal activation regularisation: `tar * mean((h_t - h_(t-1))^2)` of the top layer before dropout (task `lm`)."""
    attention_penalty: float = num(0.0, 0)
    """`P * ||A A^T - I||^2` of a classifier's attention hops `A`, added to the loss so that the hops attend to different words (task `classification` with `model.attention_hops` above 1)."""
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    """Scheduled sampling for the sequence decoders (translation, the forecast decoder)."""


@dataclass
class Config:
    """A whole run: task, where it writes, seed, and the task's data/model plus training."""

    task: str = "lm"
    """What to train: `lm`, `translation`, `tagging`, `classification`, `forecast`, or the memory lab's `adding` and `copy`."""
    run_dir: str = "runs/default"
    """Where the config, metrics and checkpoints go."""
    seed: int = num(1234, 0)
    """Seeds model initialisation, dropout and batch order."""
    data: Any = None
    """The task's data section."""
    model: Any = None
    """The task's model section."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop (the same for every task)."""


def require_file(key: str, value: str | None) -> None:
    """A data path that must exist (used by tasks' ``check_config``)."""
    if value is None:
        raise ConfigError(key, "is required (a path to a text file)")
    p = Path(value)
    if not p.is_file():
        raise ConfigError(key, f"file not found: {value!r}")


def check_metric(cfg: Config, metrics: tuple[str, ...]) -> None:
    """``train.metric`` must be one the task reports."""
    if cfg.train.metric not in metrics:
        raise ConfigError("train.metric", f"expected one of {', '.join(metrics)} for task '{cfg.task}', "
                                          f"got {cfg.train.metric!r}")
