"""``rnnkit online``: a forecaster replayed over a series as a live stream, learning as it goes."""
from __future__ import annotations

import csv
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from rnnkit.cli.common import check_output_file, note, print_results, user_errors
from rnnkit.data.vocab import DataError


def online(
    checkpoint: Path = typer.Argument(..., help="A forecaster's checkpoint (last.pt or best.pt)."),
    data: Path = typer.Option(..., "--data", help="The series as CSV, with the columns the model was trained on."),
    start: int = typer.Option(..., "--start", min=0, help="The first arriving row: the rows before it are history."),
    end: Optional[int] = typer.Option(None, "--end", min=1, help="Stop before this row (default: the file's end)."),
    protocol: str = typer.Option("leak-free", "--protocol",
                                 help="leak-free: learn from a window once all its target rows have arrived; "
                                      "published: FSNet's protocol, learning from each window's whole target "
                                      "right after forecasting it (before it arrives), to compare with the "
                                      "published tables."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adam."),
    lr: float = typer.Option(0.001, "--lr", help="The online learning rate (0: the frozen model)."),
    updates: int = typer.Option(1, "--updates", min=0, help="Optimizer steps per arrival."),
    replay_size: int = typer.Option(0, "--replay", min=0, help="Past windows kept for replay (0: none)."),
    replay_batch: int = typer.Option(8, "--replay-batch", min=0,
                                     help="--replay: past windows drawn into each update beside the new one."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE.csv",
                                          help="Write every forecast: origin, step, column, online, frozen, truth "
                                               "(original units)."),
    save: Optional[Path] = typer.Option(None, "--save", metavar="FILE.pt",
                                        help="Write the adapted model as a new checkpoint."),
    seed: int = typer.Option(0, "--seed", help="Seed of the replay draws."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Replay a series as a stream: forecast at each arriving row, then learn from what has arrived.

    Prints the cumulative MSE and MAE (standardised) of the model updated online against the same model frozen, over every window whose targets lie in [--start, --end). Nothing is written until the run ends (an interrupted run leaves no partial file).

    Example:  rnnkit online runs/forecast_online_etth1/best.pt --data ETTh1.csv --start 3600 --end 14400
    Example:  rnnkit online runs/forecast_online_etth1/best.pt --data ETTh1.csv --start 3600 --protocol published
    """
    import time

    import rnnkit
    from rnnkit.config import ConfigError
    from rnnkit.tasks.online import Online

    with user_errors():
        check_output_file(output, "--output")
        check_output_file(save, "--save")
        settings = Online(protocol, optimizer, lr, updates, replay_size, replay_batch, seed).check()
        m = rnnkit.load(checkpoint, device)
        if m.kind != "forecast":
            raise ConfigError("", f"{checkpoint}: a '{m.kind}' model; rnnkit online is for forecasters")
        if not data.is_file():
            raise DataError(f"--data: file not found: {data}")
        from tqdm import tqdm

        started = time.perf_counter()
        r = m.online(data, start, end, settings,
                     lambda it: tqdm(it, desc="online", unit="arrival", file=sys.stderr, leave=False))
        seconds = time.perf_counter() - started
        if output is not None:
            _write_forecasts(output, r, m.task.target_names)
            note(f"wrote {output}")
        if save is not None:
            m.save(save)
            note(f"wrote {save}")
    results = {k: v for k, v in r.items() if k not in ("origins", "forecasts", "frozen", "truth")
               and not k.endswith("_curve")}
    print_results({**results, "seconds": round(seconds, 1)}, as_json)


def _write_forecasts(path: Path, r: dict, columns: list[str]) -> None:
    """The forecasts as CSV, written to a temporary file and renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["origin", "step", "column", "online", "frozen", "truth"])
            for i, origin in enumerate(r["origins"]):
                for k in range(r["forecasts"].shape[1]):
                    for j, col in enumerate(columns):
                        w.writerow([int(origin), k + 1, col, f"{r['forecasts'][i, k, j]:.6g}",
                                    f"{r['frozen'][i, k, j]:.6g}", f"{r['truth'][i, k, j]:.6g}"])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
