"""The ``rnnkit`` command: thin commands that parse, load, call and print."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console

from rnnkit.config import ConfigError, load_config
from rnnkit.data.vocab import DataError
from rnnkit.training.checkpoint import CheckpointError

app = typer.Typer(
    name="rnnkit",
    help="Train and run recurrent sequence models (RNN, LSTM, GRU) from YAML configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake into one line on stderr and exit code 2, not a traceback."""
    try:
        yield
    except (ConfigError, DataError, CheckpointError) as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except RuntimeError as err:
        if "CUDA" in str(err) and "available" in str(err):
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        raise


def _bad_option(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file, e.g. configs/char_lm.yaml."),
    overrides: List[str] = typer.Option(
        [], "--set", "-s", metavar="KEY=VALUE",
        help="Override a config key, e.g. --set model.cell=gru --set train.lr=1e-3 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in run_dir from its last.pt."),
) -> None:
    """Train a model from a YAML config; checkpoints go to the config's run_dir.

    Example:  rnnkit train configs/char_lm.yaml --set model.cell=gru --set train.max_steps=2000
    """
    from rnnkit.runs import prepare_trainer

    with user_errors():
        cfg = load_config(config, overrides)
        trainer = prepare_trainer(cfg, resume=resume)
        trainer.fit()


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="A language-model checkpoint (last.pt or best.pt)."),
    prime: str = typer.Option("", "--prime", "-p", help="Text the sample starts from (echoed first)."),
    length: int = typer.Option(500, "--length", "-n", min=1, help="Tokens to sample after the prime."),
    temperature: float = typer.Option(1.0, "--temperature", "-t",
                                      help="Softmax temperature (> 0); lower is more conservative."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample only from the k likeliest tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0,
                                          help="Sample from the smallest set of tokens with this total probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; the same seed gives the same text."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="How many independent samples."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Sample text from a language model, streaming it to stdout.

    Example:  rnnkit generate runs/char_lm/best.pt --prime "ROMEO:" --temperature 0.8 --seed 1
    """
    import torch

    from rnnkit.runs import load_task

    if temperature <= 0:
        _bad_option(f"--temperature must be > 0, got {temperature}")
    if top_p is not None and top_p <= 0:
        _bad_option(f"--top-p must be in (0, 1], got {top_p}")
    with user_errors():
        task = load_task(checkpoint, device)
        if not hasattr(task, "generate"):
            raise CheckpointError(f"{checkpoint}: a '{task.cfg.task}' checkpoint cannot generate text; "
                                  f"use 'rnnkit translate' for translation models")
        gen = torch.Generator(device=task.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
        out = sys.stdout
        for i in range(num_samples):
            if num_samples > 1:
                err_console.rule(f"sample {i + 1}")
            out.write(prime)
            for piece in task.generate(prime, length, temperature, top_k, top_p, gen):
                out.write(piece)
                out.flush()
            out.write("\n")
        out.flush()


@app.command()
def translate(
    checkpoint: Path = typer.Argument(..., help="A translation checkpoint (last.pt or best.pt)."),
) -> None:
    """Translate text with a sequence-to-sequence model.

    Example:  rnnkit translate runs/en_fr/best.pt --beam 5 < input.en > output.fr
    """
    _bad_option("translation arrives with the translation task (task: translation); "
                "this build has language models only")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (last.pt or best.pt)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Language models: a text file to score."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Score a checkpoint on held-out data: loss, perplexity (and bits per character).

    Example:  rnnkit eval runs/char_lm/best.pt --data data/sample.txt --json
    """
    from rnnkit.data.vocab import read_text
    from rnnkit.runs import load_task

    with user_errors():
        task = load_task(checkpoint, device)
        if task.cfg.task == "lm":
            if data is None:
                _bad_option("--data FILE is required to evaluate a language model")
            if not data.is_file():
                raise DataError(f"--data: file not found: {data}")
            results = task.evaluate_text(read_text(str(data)))
        else:
            _bad_option(f"eval does not support task {task.cfg.task!r} yet")
    _print_results(results, as_json)


def _print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    from rich.table import Table

    table = Table(show_header=False)
    for k, v in results.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def main() -> None:
    app(prog_name="rnnkit")


if __name__ == "__main__":
    main()
