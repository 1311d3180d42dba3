"""One trial: an ordinary run folder (``trial-0007/`` with config.yaml, metrics.jsonl and
best.pt), trained in this process, every evaluation reported to the pruner.

The trial's value is its best evaluation of the config's ``train.metric`` (what ``best.pt``
holds). A pruned trial stops as after SIGTERM (``last.pt`` saved at the evaluation that
pruned it); a trial that fails (a config the task refuses, a non-finite loss, out of
memory) is marked failed with a one-line reason and the study goes on; a trial stopped by a
signal is marked failed as interrupted and queued to continue from its ``last.pt``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from rnnkit.config import load_config
from rnnkit.tune.space import Param, overrides
from rnnkit.tune.study import WORKER_VARIABLE, StudySpec

CONTINUES = "continues"        # user attribute: the folder of the trial this one continues


class Interrupted(Exception):
    """A signal stopped the trial; the worker stops after it."""


def folder_name(number: int) -> str:
    return f"trial-{number:04d}"


def _continued_folder(study: Any, trial: Any, spec: StudySpec) -> Path | None:
    """The folder of the trial this one takes over: one interrupted (queued with its folder),
    or one whose worker died (Optuna's retry names its number)."""
    import optuna

    given = trial.user_attrs.get(CONTINUES)
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == trial.number), None)
    if frozen is None:
        return spec.folder / given if given else None
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # Optuna marks these experimental
        retried, history = retry.retried_trial_number(frozen), retry.retry_history(frozen)
    if retried is None:
        return spec.folder / given if given else None
    # the most recent attempt of that trial left the newest state
    history = history or [retried]
    return spec.folder / folder_name(history[-1])


def _take_over(previous: Path | None, folder: Path) -> bool:
    """Copy an earlier attempt's run folder into this trial's; whether there is a last.pt to resume."""
    if previous is None or not (previous / "last.pt").is_file():
        return False
    shutil.copytree(previous, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock", "train.log"))
    return True


@contextlib.contextmanager
def logged_to(path: Path) -> Iterator[None]:
    """The process's stdout and stderr (progress bars, the run's table) into ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "out of memory" in text.lower():
        return f"out of memory: {text[:200]}"
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def run_trial(study: Any, trial: Any, spec: StudySpec, params: list[Param]) -> float:
    """Train trial ``trial``'s config in ``spec.folder``; its best metric value."""
    import optuna

    from rnnkit.runs import prepare_trainer

    values = {p.key: p.suggest(trial) for p in params}
    folder = spec.folder / folder_name(trial.number)
    trial.set_user_attr("folder", folder.name)
    trial.set_user_attr("worker", int(os.environ.get(WORKER_VARIABLE, "0")))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cfg = load_config(spec.config, [*overrides(params, values), f"run_dir={folder}"])
        resume = _take_over(_continued_folder(study, trial, spec), folder)
        with logged_to(folder / "train.log"):
            trainer = prepare_trainer(cfg, resume=resume)
            metric = cfg.train.metric

            def report(step: int, results: dict[str, float]) -> str | None:
                trial.report(results[metric], step)
                trial.set_user_attr("steps", step)
                return "pruned" if trial.should_prune() else None

            trainer.after_eval = report
            trainer.fit()
    except Exception as err:
        trial.set_user_attr("reason", one_line(err))
        raise
    p = trainer.progress
    trial.set_user_attr("steps", p.step)
    trial.set_user_attr("minutes", round(p.elapsed / 60, 2))
    if trainer.stop_signal is not None:
        study.enqueue_trial(values, user_attrs={CONTINUES: folder.name})
        raise Interrupted(f"{trainer.stop_signal}: stopped at step {p.step}; queued to continue")
    if trainer.stopped_by == "pruned":
        raise optuna.TrialPruned(f"pruned at step {p.step}")
    if p.best is None:
        trial.set_user_attr("reason", "no evaluation ran (train.max_steps below train.eval_every?)")
        raise RuntimeError("no evaluation")
    return float(p.best)
