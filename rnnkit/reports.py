"""Looking at runs after the fact: curves from metrics.jsonl, a table comparing runs, a
model card for a checkpoint, and checkpoint averaging."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from rnnkit.data.vocab import DataError
from rnnkit.training.checkpoint import CheckpointError, load_checkpoint


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}: line {number} is not JSON") from None
    return rows


def expand_runs(paths: list[Path]) -> list[Path]:
    """The run directories ``paths`` name: a path with a metrics.jsonl is one run; a folder
    without one that holds runs (``runs/``) stands for each of them, in name order."""
    found: list[Path] = []
    for path in map(Path, paths):
        inside = sorted(d for d in path.iterdir() if (d / "metrics.jsonl").is_file()) \
            if path.is_dir() and not (path / "metrics.jsonl").is_file() else []
        found.extend(inside or [path])
    return found


def run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def eval_metrics(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows if r.get("kind") == "eval" for k in r if k.startswith("valid_")})


def plot_runs(run_dirs: list[Path], metric: str | None, out: Path) -> str:
    """Training loss and one validation metric against steps, one line per run; returns the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {str(d): read_metrics(d) for d in run_dirs}
    if metric is None:
        metric = "valid_loss"
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval" and metric in r]
        if not evals and metric not in eval_metrics(rows):
            have = ", ".join(eval_metrics(rows)) or "none"
            raise DataError(f"{name}: no {metric} in its evaluations (it has {have})")
        label = Path(name).name or name
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label=label)
        ax_metric.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o", ms=3, lw=1, label=label)
    ax_loss.set_title("training loss")
    ax_metric.set_title(metric)
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return metric


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def compare_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per run: task, the config keys that differ between the runs, steps, time, best."""
    configs = [_flatten(run_config(d)) for d in run_dirs]
    shared = set.intersection(*(set(c) for c in configs)) - {"run_dir"} if configs else set()
    differ = [k for k in sorted(shared) if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    rows = []
    for d, cfg in zip(run_dirs, configs):
        records = read_metrics(d)
        train = [r for r in records if r.get("kind") == "train"]
        metric = cfg.get("train.metric", "valid_loss")
        mode = cfg.get("train.metric_mode", "min")
        evals = [r for r in records if r.get("kind") == "eval" and metric in r]
        best = (min if mode == "min" else max)(evals, key=lambda r: r[metric]) if evals else None
        rows.append({"run": str(d), "task": cfg.get("task", "?"),
                     "differs": _shown(differ, cfg),
                     "steps": train[-1]["step"] if train else 0,
                     "minutes": round(train[-1]["elapsed"] / 60, 1) if train else 0.0,
                     "metric": metric, "best": best[metric] if best else None,
                     "best_step": best["step"] if best else None})
    return rows


def _shown(keys: list[str], cfg: dict[str, Any], most: int = 6) -> str:
    text = ", ".join(f"{k}={cfg.get(k)}" for k in keys[:most])
    return (text + (f", +{len(keys) - most} more" if len(keys) > most else "")) or "-"


def parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


def model_card(path: Path) -> dict[str, Any]:
    """What a checkpoint is: task, architecture, sizes, training so far, versions, how to continue."""
    ckpt = load_checkpoint(path)
    cfg, progress = ckpt["config"], ckpt.get("progress", {})
    extras = ckpt.get("task", {})
    sizes = {}
    for key in ("vocab", "words", "labels", "tags", "chars", "columns", "targets"):
        if isinstance(extras.get(key), list):
            sizes[key] = len(extras[key])
    for side in ("src", "tgt"):
        if isinstance(extras.get(side), dict) and isinstance(extras[side].get("vocab"), list):
            sizes[f"{side}_vocab"] = len(extras[side]["vocab"])
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    model = cfg.get("model", {})
    metric = cfg.get("train", {}).get("metric", "valid_loss")
    return {
        "checkpoint": str(path), "task": cfg.get("task"),
        "model": ", ".join(f"{k}={v}" for k, v in _flatten(model).items()),
        "parameters": parameter_count(ckpt["model"]), **{f"{k}_size": v for k, v in sizes.items()},
        **({"tokenizer": cfg.get("data", {}).get("tokenizer")} if cfg.get("task") == "lm" else {}),
        "steps": progress.get("step"), "epochs": progress.get("epoch"),
        "minutes_trained": round(progress.get("elapsed", 0.0) / 60, 1),
        f"best_{metric}": progress.get("best"), "best_step": progress.get("best_step"),
        "config_sha256": digest, "rnnkit_version": ckpt.get("rnnkit_version", "?"),
        "torch_version": torch.__version__,
        "continue_with": f"rnnkit train {Path(cfg.get('run_dir', '.')) / 'config.yaml'} --resume",
    }


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """The last checkpoint with its weights replaced by the elementwise mean of all of them
    (one run's checkpoints: same task, model, vocabulary and shapes)."""
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths[1:], ckpts[1:]):
        if any(c["config"].get(k) != first["config"].get(k) for k in ("task", "model")):
            raise CheckpointError(f"{p}: another task or model than {paths[0]}; only checkpoints of one run average")
        if c["model"].keys() != first["model"].keys() or any(
                c["model"][k].shape != first["model"][k].shape for k in first["model"]):
            raise CheckpointError(f"{p}: its parameters' shapes differ from {paths[0]}'s")
        if c.get("task") != first.get("task"):
            raise CheckpointError(f"{p}: its vocabulary or tokenizer differs from {paths[0]}'s")
    averaged = {}
    for k, t in first["model"].items():
        if t.is_floating_point():
            averaged[k] = torch.stack([c["model"][k].double() for c in ckpts]).mean(0).to(t.dtype)
        else:
            averaged[k] = t
    out = dict(ckpts[-1])
    out["model"] = averaged
    out["averaged_from"] = [str(p) for p in paths]
    return out
