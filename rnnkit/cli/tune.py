"""``rnnkit tune``: hyperparameter sweeps on Optuna, each trial an ordinary run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rnnkit.cli.common import bad_option, err_console, user_errors


def tune(
    config: Optional[Path] = typer.Argument(None, help="The config every trial starts from, e.g. "
                                                       "configs/sentiment.yaml."),
    space: Optional[Path] = typer.Argument(None, help="The search space: config keys and their ranges or choices "
                                                      "(YAML)."),
    trials: int = typer.Option(20, "--trials", "-n", min=1,
                               help="The study's total of finished trials; the same command again tops it up."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0, metavar="MIN",
                                            help="Start no trial after this many minutes (a running one finishes)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1,
                             help="Trial processes on this machine; they share the CPU threads, and take one GPU "
                                  "each, round-robin."),
    study: Optional[str] = typer.Option(None, "--study", help="The study's name; default CONFIG-SPACE from the "
                                                             "file names."),
    directory: Path = typer.Option(Path("runs"), "--dir", help="Where study folders go: DIR/STUDY/."),
    storage: Optional[str] = typer.Option(None, "--storage", metavar="URL",
                                          help="A database URL shared by machines (postgresql://...); default an "
                                               "SQLite file in the study folder."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, random or grid (every range needs a step)."),
    pruner: str = typer.Option("asha", "--pruner", help="asha, median or none."),
    seed: Optional[int] = typer.Option(None, "--seed", help="The sampler's seed (a sweep on one worker repeats)."),
    show: Optional[str] = typer.Option(None, "--show", metavar="STUDY",
                                       help="Print a study (a study folder, or a name with --storage): its trials "
                                            "best first, the parameters' importances; write its plots."),
) -> None:
    """Sweep hyperparameters: trials of CONFIG with values from SPACE, chosen by Optuna, pruned early when they lag.

    SPACE maps config keys to ranges or choices, checked against the config before any trial runs:

        train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        model.dropout: {low: 0.1, high: 0.6}
        model.hidden_size: {low: 64, high: 512, step: 64}

    A key may also take a list of choices instead of a range (see configs/sweeps/ and the sweeps page of the docs).

    Each trial is a run folder, DIR/STUDY/trial-0007/ (config.yaml, metrics.jsonl, best.pt), so rnnkit runs, plot and eval work on it. A trial's value is its best evaluation of the config's train.metric; every evaluation reports to the pruner. A pruned trial stops with last.pt saved; a failed one is marked with its reason and the study goes on. DIR/STUDY/best.yaml is the best trial's config, rewritten whenever the best improves.

    Killed, or stopped by Ctrl-C or SIGTERM, the same command continues the study: completed trials are kept, a trial that was running continues from its last.pt. It exits 0 once at least one trial of the study has completed.

    Example:  rnnkit tune configs/sentiment.yaml configs/sweeps/sentiment.yaml --trials 30 --jobs 2
    """
    from rnnkit.tune.study import PRUNERS, SAMPLERS, StudySpec, default_storage, open_study, progress, write_best

    with user_errors():
        if show is not None:
            _show(show, storage)
            return
        if config is None or space is None:
            bad_option("give CONFIG and SPACE to sweep, or --show STUDY to look at one")
        if sampler not in SAMPLERS:
            bad_option(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if pruner not in PRUNERS:
            bad_option(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
        from rnnkit.tune.space import read_space

        params = read_space(space, config, sampler)
        name = study or f"{config.stem}-{space.stem}"
        if not name or "/" in name:
            bad_option(f"--study must be a plain name, got {name!r}")
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        spec = StudySpec(name, folder.resolve(), storage or default_storage(folder), config.resolve(),
                         space.resolve(), sampler, pruner, trials, None if timeout is None else timeout * 60, seed)
        handle = open_study(spec, params)
        done, _ = progress(handle)
        where = "" if storage is None else f", storage {storage}"
        err_console.print(f"study '{name}' in {folder}{where}: {done} of {trials} trials finished; "
                          f"{spec.sampler} sampler, {spec.pruner} pruner, {jobs} job{'s' if jobs > 1 else ''}",
                          highlight=False, soft_wrap=True)
        for p in params:
            err_console.print(f"  {p.describe()}", highlight=False, soft_wrap=True)
        say = lambda line: err_console.print(line, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
        if jobs == 1:
            from rnnkit.tune.workers import work

            code = 143 if work(spec, say) else 0
        else:
            from rnnkit.tune.workers import run_parallel

            code = run_parallel(spec, jobs, say)
        handle = open_study(spec, params)
        best = write_best(handle, folder)
    _summary(handle, folder, best)
    if code:
        err_console.print("stopped; the same command continues the study", highlight=False, soft_wrap=True)
        raise typer.Exit(code)
    if best is None:
        err_console.print("no trial of the study has completed", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _summary(study, folder: Path, best: Optional[Path]) -> None:
    from optuna.trial import TrialState

    counts = {s: 0 for s in ("complete", "pruned", "fail", "running", "waiting")}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    err_console.print("trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), highlight=False, soft_wrap=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if complete and best is not None:
        b = study.best_trial
        err_console.print(f"best: trial {b.number}, {study.user_attrs.get('metric', 'value')} {b.value:.5g}; "
                          f"its config: {best}; all trials: rnnkit tune --show {folder}", highlight=False, soft_wrap=True)


def _show(target: str, storage: Optional[str]) -> None:
    from rich.table import Table

    from rnnkit.config import ConfigError
    from rnnkit.tune.report import importances, table_rows, write_plots
    from rnnkit.tune.study import default_storage, open_storage

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = Path(target)
    if storage is None:
        if not (folder / "study.db").is_file():
            raise ConfigError("", f"--show {target}: not a study folder (no study.db); give a study folder, or a "
                                  f"study name with --storage URL")
        url, name = default_storage(folder), None
    else:
        url, name, folder = storage, target, Path("runs") / target
    store = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if name is None:
        if len(names) != 1:
            raise ConfigError("", f"--show {target}: {len(names)} studies there; name one with --storage")
        name = names[0]
    if name not in names:
        raise ConfigError("", f"--show: no study '{name}' in {url}; it holds {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=name, storage=store)
    header, rows = table_rows(study)
    table = Table(title=f"study '{name}': {len(rows)} trials, best first")
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    import sys

    from rich.console import Console

    # a terminal folds the table to its width; a pipe or a file gets it whole, one trial a line
    Console(width=None if sys.stdout.isatty() else 400).print(table)
    imp = importances(study)
    if imp:
        print("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    if folder.is_dir():
        written = write_plots(study, folder)
        if written:
            err_console.print(f"wrote {', '.join(p.name for p in written)} in {folder}", highlight=False, soft_wrap=True)

