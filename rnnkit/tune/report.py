"""``rnnkit tune --show``: a study's trials (best first), its parameters' importances, and
its plots as PNG files in the study folder."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

PLOTS = ("optimization_history", "intermediate_values", "parallel_coordinate")


def ordered(study: Any) -> list:
    """Complete trials best first, then pruned (furthest first), then the rest by number."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    sign = -1.0 if study.direction.name.lower() == "maximize" else 1.0
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: sign * t.value)
    pruned = sorted((t for t in trials if t.state == TrialState.PRUNED), key=lambda t: -(t.last_step or 0))
    rest = [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    return complete + pruned + rest


def table_rows(study: Any) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of the trials table."""
    from optuna.trial import TrialState

    keys = list(study.user_attrs.get("space", {}))
    metric = study.user_attrs.get("metric", "value")
    header = ["trial", "state", metric, *keys, "steps", "minutes", "note"]
    rows = []
    for t in ordered(study):
        value = f"{t.value:.5g}" if t.state == TrialState.COMPLETE else ""
        if t.state != TrialState.COMPLETE and t.intermediate_values:     # its last evaluation
            value = f"({t.intermediate_values[t.last_step]:.5g})"
        minutes = t.user_attrs.get("minutes")
        if minutes is None and t.duration is not None:
            minutes = round(t.duration.total_seconds() / 60, 2)
        params = [_short(t.params.get(k, "")) for k in keys]
        rows.append([str(t.number), t.state.name.lower(), value, *params, str(t.user_attrs.get("steps", "")),
                     "" if minutes is None else f"{minutes:.1f}", t.user_attrs.get("reason", "")])
    return header, rows


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def importances(study: Any) -> dict[str, float] | None:
    """The parameters' importances (Optuna's fANOVA) once two trials are complete."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2 or not complete[0].params:
        return None
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):      # e.g. every complete trial has the same value
        return None


def write_plots(study: Any, folder: Path) -> list[Path]:
    """The optimisation history, the intermediate values and the parallel coordinates as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as vis

    written = []
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return written
    for name in PLOTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # Optuna marks its matplotlib plots experimental
            try:
                ax = getattr(vis, f"plot_{name}")(study)
            except (ValueError, RuntimeError):
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        path = folder / f"{name}.png"
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
