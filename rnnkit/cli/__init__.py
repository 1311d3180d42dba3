"""The ``rnnkit`` command: thin commands that parse, call the API and print.

One module per group of commands; this one builds the Typer app from them and holds the
entry point. A command's docstring is its help: the first paragraph is the summary the
command list shows, written on one line so it reads whole at any terminal width.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer

from rnnkit.cli import data, evaluate, export, inference, online, runs, schema, serve, training, tune
from rnnkit.cli.common import err_console

app = typer.Typer(
    name="rnnkit",
    help="Train and run recurrent sequence models (RNN, LSTM, GRU; minGRU, minLSTM, RG-LRU, sLSTM, mLSTM) from YAML configs.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="The corpora the configs use: list them, fetch and verify them.", no_args_is_help=True)
app.add_typer(data_app, name="data")

for command in (training.train, inference.generate, inference.translate, inference.predict, runs.plot):
    app.command()(command)
app.command("runs")(runs.compare)
for command in (runs.average, runs.info, training.prepare, serve.serve, export.export, tune.tune, schema.schema):
    app.command()(command)
app.command("eval")(evaluate.evaluate)
app.command()(online.online)
data_app.command("list")(data.data_list)
data_app.command("get")(data.data_get)
data_app.command("info")(data.data_info)


def main(argv: Optional[List[str]] = None) -> None:
    """The ``rnnkit`` entry point: Typer's own usage errors (a bad option value, a missing
    argument) become one line and exit code 2, like every other mistake."""
    try:
        from typer._click import exceptions as click_exceptions
    except ImportError:     # typer versions that use click itself
        from click import exceptions as click_exceptions

    from rnnkit.hardware import bound_kernel_cache, keep_freed_memory

    keep_freed_memory()
    bound_kernel_cache()
    try:
        code = app(args=argv, prog_name="rnnkit", standalone_mode=False)
    except click_exceptions.ClickException as err:
        no_args = getattr(click_exceptions, "NoArgsIsHelpError", ())
        if isinstance(err, no_args):
            print(err.format_message())
            sys.exit(2)
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(err.format_message().split())
        err_console.print(f"[bold red]error:[/] {message}{hint}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(2)
    except (typer.Abort, getattr(click_exceptions, "Abort", typer.Abort)):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def run() -> None:
    """The console command (and ``python -m rnnkit``): :func:`main`, then the process ends
    as Python's exit would end it (atexit handlers, flushed output, the same exit code)
    but without its teardown of every imported module, which takes about half a second
    once torch is imported, on every command. :func:`main` itself exits normally (tests
    call it in-process)."""
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if code is None:
        code = 0
    elif not isinstance(code, int):      # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):    # a closed pipe (rnnkit ... | head) or stream
            pass
    os._exit(code)
