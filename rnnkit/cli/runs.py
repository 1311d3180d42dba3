"""``rnnkit plot``, ``runs``, ``average`` and ``info``: looking at runs and checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rnnkit.cli.common import (bad_option, check_output_file, err_console, print_results, user_errors)


def plot(
    runs: List[Path] = typer.Argument(..., help="Run directories (each with its metrics.jsonl), or a folder of "
                                                "them (runs/: every run in it)."),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="Validation metric to draw, e.g. valid_bleu "
                                                                        "(default: valid_loss)."),
    out: Path = typer.Option(Path("runs.png"), "--output", "-o", help="PNG file to write."),
) -> None:
    """Draw training loss and a validation metric against steps, several runs on one figure.

    Example:  rnnkit plot runs/en_fr runs/en_fr_gru --metric valid_bleu -o compare.png
    """
    from rnnkit.reports import expand_runs, plot_runs

    with user_errors():
        check_output_file(out, "--output")
        runs = expand_runs(runs)
        drawn = plot_runs(runs, metric, out)
    err_console.print(f"wrote {out} (training loss and {drawn} of {len(runs)} run{'s' * (len(runs) > 1)})")


def compare(
    runs: List[Path] = typer.Argument(..., help="Run directories to compare, or a folder of them (runs/: every "
                                                "run in it)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
) -> None:
    """Compare runs: task, the config keys that differ, steps, minutes, best metric and its step.

    Example:  rnnkit runs runs/      (every run in the folder; or name them: runs/a runs/b)
    """
    from rich.table import Table

    from rnnkit.reports import compare_runs, expand_runs
    from rnnkit.training.progress import format_number

    with user_errors():
        rows = compare_runs(expand_runs(runs))
    if as_json:
        print(json.dumps(rows))
        return
    table = Table()
    for col in ("run", "task", "differs", "steps", "minutes", "metric", "best", "best_step"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(format_number(v) if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(table)


def average(
    checkpoints: List[Path] = typer.Argument(..., help="Checkpoints of one run, e.g. saved at several steps."),
    out: Path = typer.Option(..., "--output", "-o", help="Where to write the averaged checkpoint."),
) -> None:
    """Average the weights of checkpoints of one run.

    Often a free gain in translation; the result loads wherever a checkpoint does.

    Example:  rnnkit average runs/en_fr/step8000.pt runs/en_fr/step9000.pt runs/en_fr/last.pt -o avg.pt
    """
    from rnnkit.reports import average_checkpoints
    from rnnkit.training.checkpoint import atomic_save

    with user_errors():
        check_output_file(out, "--output")
        if out.resolve() in {c.resolve() for c in checkpoints}:
            bad_option(f"--output {out} is one of the checkpoints being averaged; choose another file")
        atomic_save(average_checkpoints(checkpoints), out)
    err_console.print(f"wrote {out}: the mean of {len(checkpoints)} checkpoints")


def info(
    checkpoint: Path = typer.Argument(..., help="A checkpoint, or a folder written by 'rnnkit export'."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Show a checkpoint's model card.

    Task, architecture, parameters, vocabulary sizes, training so far, best validation metric, config hash, versions, and the command that continues it. For an export: the card of the checkpoint it came from, and how it runs.

    Example:  rnnkit info runs/en_fr/best.pt
    """
    with user_errors():
        if checkpoint.is_dir():
            from rnnkit.runtime import load_export

            card = load_export(checkpoint).card()
        else:
            from rnnkit.reports import model_card

            card = model_card(checkpoint)
    print_results(card, as_json)
