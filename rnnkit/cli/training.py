"""``rnnkit train`` and ``rnnkit prepare``: runs and their prepared data."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rnnkit.config import ConfigError, load_config
from rnnkit.cli.common import (err_console, print_store, user_errors)


def train(
    config: Path = typer.Argument(..., help="YAML config file, e.g. configs/char_lm.yaml."),
    overrides: List[str] = typer.Option(
        [], "--set", "-s", metavar="KEY=VALUE",
        help="Override a config key, e.g. --set model.cell=gru --set train.lr=1e-3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in run_dir from its last.pt."),
    auto_resume: bool = typer.Option(
        False, "--auto-resume",
        help="Continue the run in run_dir if it holds one, else start it: a requeued batch job can repeat "
             "its command line."),
) -> None:
    """Train a model from a YAML config; checkpoints go to the config's run_dir.

    Ctrl-C or SIGTERM (a scheduler's preemption) finishes the current step, saves last.pt and exits with 130 or 143; the same command with --resume (or --auto-resume) continues exactly where it stopped. A run directory has one writer at a time.

    Example:  rnnkit train configs/char_lm.yaml --set model.cell=gru --set train.max_steps=2000
    """
    from rnnkit.runs import prepare_trainer
    from rnnkit.training import distributed

    with user_errors():
        distributed.init()      # under torchrun: join the process group (gloo on CPU, NCCL on GPU)
        ok = False
        try:
            cfg = load_config(config, overrides)
            if auto_resume:
                resume = (Path(cfg.run_dir) / "last.pt").exists()
            trainer = prepare_trainer(cfg, resume=resume)
            trainer.fit()
            ok = True
        finally:
            distributed.finish(ok)
    if trainer.stop_signal is not None:
        again = " ".join([str(config), *(f"--set {o}" for o in overrides)])
        err_console.print(f"continue with: rnnkit train {again} --resume", highlight=False, soft_wrap=True)
        raise typer.Exit(trainer.exit_code)


def prepare(
    config: Path = typer.Argument(..., help="YAML config of a translation or language-model run."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="Override a config key."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1,
                                          help="Processes that tokenise (default: this machine's cores)."),
) -> None:
    """Tokenise a translation or language-model config's data once, into a prepared store.

    A store is a folder of flat token-id files that training reads instead of the corpus, in constant memory, in one process or on every torchrun rank. 'rnnkit train' prepares the store itself when it is missing; prepare by hand to do it once for many jobs (e.g. on one node, with RNNKIT_CACHE on a shared disk). Prints the store's folder on stdout.

    Example:  rnnkit prepare configs/translate_attention.yaml --workers 8
    """
    from rnnkit.tasks import task_module

    with user_errors():
        cfg = load_config(config, overrides)
        module = task_module(cfg.task)
        if not hasattr(module, "prepare_data"):
            raise ConfigError("task", f"'{cfg.task}' reads its data in memory at the start of training; "
                                      f"'lm' and 'translation' runs have stores to prepare")
        store = module.prepare_data(cfg, None, workers)
        print_store(store)
    print(store.path)
