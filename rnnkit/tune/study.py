"""A study: where it is stored, how it samples and prunes, what is finished, and ``best.yaml``.

The default storage is an SQLite file in the study folder (``runs/<study>/study.db``); any
SQLAlchemy URL Optuna takes (``postgresql://...``) shares one study between machines. Trials
send heartbeats: a trial left running by a worker that died is marked failed once its
heartbeat is older than the grace period, and tried again (continuing from its ``last.pt``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from rnnkit.config import ConfigError, load_config
from rnnkit.tune.space import Param

HEARTBEAT_VARIABLE = "RNNKIT_TUNE_HEARTBEAT"     # seconds between a trial's heartbeats (default 5)
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "median", "none")

WORKER_VARIABLE = "RNNKIT_TUNE_WORKER"      # set in a worker process: its index


class StudySpec(NamedTuple):
    """What the command line says about a study (every worker gets the same)."""
    name: str
    folder: Path
    storage: str            # an SQLAlchemy URL
    config: Path
    space: Path
    sampler: str
    pruner: str
    trials: int             # the study's total of finished trials to reach
    timeout: float | None   # seconds for this invocation, or None
    seed: int | None

    def to_json(self) -> str:
        return json.dumps({**self._asdict(), "folder": str(self.folder), "config": str(self.config),
                           "space": str(self.space)})

    @classmethod
    def from_json(cls, text: str) -> "StudySpec":
        d = json.loads(text)
        return cls(**{**d, "folder": Path(d["folder"]), "config": Path(d["config"]), "space": Path(d["space"])})


def heartbeat_interval() -> int:
    return max(1, int(os.environ.get(HEARTBEAT_VARIABLE, "5")))


def heartbeat_grace() -> int:
    """How old a running trial's last heartbeat may be before the trial counts as abandoned."""
    return 3 * heartbeat_interval()


def default_storage(folder: Path) -> str:
    return f"sqlite:///{folder.resolve() / 'study.db'}"


def open_storage(url: str) -> Any:
    """Optuna's database storage with heartbeats, failed trials retried (three times at most)."""
    import optuna

    beat = heartbeat_interval()
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # Optuna marks heartbeats experimental
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=beat,
                                              grace_period=heartbeat_grace(), heartbeat_stale_trial_callback=retry)
    except Exception as err:          # SQLAlchemy's own types: a bad URL, a server that is not there
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError("", f"--storage {url}: cannot open the study's storage ({first})") from None


def sampler_for(name: str, params: list[Param], seed: int | None) -> Any:
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in params}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel workers do not all sample next to a trial still running
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def pruner_for(name: str) -> Any:
    import optuna

    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4)
    return optuna.pruners.NopPruner()


def sampler_seed(seed: int, trials: int) -> int:
    """The sampler's seed in this process: from the study's ``--seed``, the worker's index and
    the trials already in the study, so that parallel workers, and a command that continues a
    study, do not replay one another's draws (``seed + i`` would: worker 1 at 0 trials would
    repeat worker 0 at 1)."""
    import numpy as np

    worker = int(os.environ.get(WORKER_VARIABLE, "0"))
    return int(np.random.SeedSequence([seed, worker, trials]).generate_state(1)[0])


def open_study(spec: StudySpec, params: list[Param]) -> Any:
    """The study, created on first use (its direction from the config's ``train.metric_mode``,
    the space and config recorded); a later command must sweep the same space the same way."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)       # rnnkit prints one line per trial
    cfg = load_config(spec.config)
    direction = "minimize" if cfg.train.metric_mode == "min" else "maximize"
    space = {p.key: p.describe() for p in params}
    study = optuna.create_study(storage=open_storage(spec.storage), sampler=sampler_for(spec.sampler, params, None),
                                pruner=pruner_for(spec.pruner), study_name=spec.name, direction=direction,
                                load_if_exists=True)
    if spec.seed is not None:
        study.sampler = sampler_for(spec.sampler, params, sampler_seed(spec.seed, len(study.trials)))
    recorded = study.user_attrs
    if not recorded:
        study.set_user_attr("space", space)
        study.set_user_attr("metric", cfg.train.metric)
        study.set_user_attr("config", str(spec.config))
        return study
    if recorded.get("space") != space:
        raise ConfigError("", f"study '{spec.name}' sweeps another space ({'; '.join(recorded['space'].values())}); "
                              f"continue it with that space, or start a new study (--study NAME)")
    if recorded.get("metric") != cfg.train.metric or study.direction.name.lower() != direction:
        raise ConfigError("train.metric", f"study '{spec.name}' optimises {recorded.get('metric')} "
                                          f"({study.direction.name.lower()}); the config now says {cfg.train.metric} "
                                          f"({cfg.train.metric_mode}); start a new study (--study NAME)")
    return study


def counted(trial: Any) -> bool:
    """Whether a trial counts toward ``--trials``: complete, pruned, or failed for a reason of
    its own (not one interrupted, or left behind by a worker that died, which are tried again)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "reason" in trial.user_attrs


def progress(study: Any) -> tuple[int, int]:
    """(finished trials that count, trials running now)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return sum(counted(t) for t in trials), sum(t.state == TrialState.RUNNING for t in trials)


def write_best(study: Any, folder: Path) -> Path | None:
    """``best.yaml``: the best trial's whole config (its run folder's config.yaml), written
    under a temporary name and renamed; None while no trial is complete."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    source = folder / best.user_attrs.get("folder", "") / "config.yaml"
    if not source.is_file():
        return None
    import yaml

    target = folder / "best.yaml"
    tmp = folder / f".best.yaml.{os.getpid()}"
    tree = yaml.safe_load(source.read_text(encoding="utf-8"))
    tree["run_dir"] = str(folder / "best")         # a new run: the trial's folder holds the trial
    value = f"{best.value:.6g}"
    tmp.write_text(f"# the best trial of study '{study.study_name}' so far: trial {best.number} "
                   f"({best.user_attrs.get('folder')}), {study.user_attrs.get('metric', 'value')} {value}\n"
                   f"# rnnkit train {target} trains it again (in {tree['run_dir']})\n"
                   + yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    os.replace(tmp, target)
    return target
