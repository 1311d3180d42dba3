"""What every command shares: the error handling that turns a user's mistake into one line, and
the common options and printing."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, NoReturn, Optional

import typer
from rich.console import Console

from rnnkit.config import ConfigError
from rnnkit.data.vocab import DataError
from rnnkit.training.checkpoint import CheckpointError

err_console = Console(stderr=True)
MAX_GENERATE = 1_000_000


def check_output_file(path: Optional[Path], option: str) -> None:
    """An output path must be writable before any work starts (not after an hour of it)."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DataError(f"{option}: directory {parent} does not exist")
    if path.is_dir():
        raise DataError(f"{option}: {path} is a directory")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake into one line on stderr and exit code 2, not a traceback."""
    from rnnkit.training.run_lock import RunLockError
    from rnnkit.training.interface import TrainingError

    try:
        yield
    except (ConfigError, DataError, CheckpointError, RunLockError) as err:
        bad_option(str(err))
    except TrainingError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130)
    except MemoryError:
        bad_option("out of memory; use smaller model sizes, batches or inputs")
    except RuntimeError as err:   # torch's allocator failing on sizes the config or input asked for
        if "can't allocate memory" in str(err) or "out of memory" in str(err).lower():
            bad_option(f"out of memory ({str(err).splitlines()[0][:120]}); use smaller model sizes, batches "
                        f"or inputs")
        raise
    except OSError as err:      # writing an output the user named
        if err.filename is None:
            raise
        bad_option(f"cannot write {err.filename}: {err.strerror}")


def precision_option():
    return typer.Option("fp32", "--precision", help="fp32 (exact) or bf16 (autocast: faster on CPUs with "
                                                    "AVX512-BF16/AMX and on GPUs).")


def int8_option():
    return typer.Option(False, "--int8", help="CPU: dynamic int8 quantisation of the linear and LSTM/GRU layers "
                                              "(faster; close to fp32, see docs/arithmetic.md).")


def bad_option(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def note(text: str) -> None:
    err_console.print(text, highlight=False)


def arithmetic(task, precision: str, int8: bool):
    """Inference arithmetic: fp32 as trained, bf16 under autocast, or int8 linear and LSTM/GRU layers."""
    from rnnkit.api import inference_arithmetic

    return inference_arithmetic(task, precision, int8, note)()


class OneProcess(NamedTuple):
    """The rank of a process that works alone (no torchrun, or an export)."""
    rank: int = 0
    world: int = 1
    main: bool = True


def under_torchrun() -> bool:
    """Whether torchrun (or any launcher that sets WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def ranks(m) -> Iterator:
    """This process's rank for work that torchrun's processes share; a checkpoint's only: an
    export runs in one process and never imports torch."""
    if m.backend == "onnxruntime" or not under_torchrun():
        yield OneProcess()
        return
    from rnnkit.training import distributed

    rank = distributed.init()
    yield rank
    distributed.finish()


def split_across_ranks(items: list, rank, work) -> list:
    """``work(items)``, or under torchrun each rank's ``work`` on a contiguous share of the
    items, gathered in input order (every rank gets the whole list)."""
    if rank.world == 1:
        return work(items)
    import torch.distributed as dist

    from rnnkit.training import distributed

    lo, hi = distributed.share(len(items), rank)
    parts: list = [None] * rank.world
    dist.all_gather_object(parts, work(items[lo:hi]))
    return [x for part in parts for x in part]


def print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    from rich.table import Table

    from rnnkit.training.progress import format_number

    table = Table(show_header=False)
    for k, v in results.items():
        if isinstance(v, dict):     # per-type scores: one row each
            for name, scores in v.items():
                shown = "  ".join(f"{m}={format_number(x) if isinstance(x, float) else x}" for m, x in scores.items())
                table.add_row(f"{k}: {name}", shown)
        elif k == "confusion":
            table.add_row("confusion (rows: gold, columns: predicted)",
                          "\n".join(" ".join(f"{n:>6}" for n in row) for row in v))
        else:
            table.add_row(k, format_number(v) if isinstance(v, float) else str(v))
    Console().print(table)


def print_store(store) -> None:
    from rich.table import Table

    table = Table(show_header=False, title="prepared store")
    for what, value in store.summary():
        table.add_row(what, value)
    err_console.print(table)
