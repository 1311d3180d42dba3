"""The ``rnnkit`` command: thin commands that parse, load, call and print."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, NoReturn, Optional

import typer
from rich.console import Console

from rnnkit.config import ConfigError, load_config
from rnnkit.data.vocab import DataError
from rnnkit.training.checkpoint import CheckpointError

app = typer.Typer(
    name="rnnkit",
    help="Train and run recurrent sequence models (RNN, LSTM, GRU) from YAML configs.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
MAX_GENERATE = 1_000_000
data_app = typer.Typer(help="The corpora the configs use: list them, fetch and verify them.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _output_file(path: Optional[Path], option: str) -> None:
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
    from rnnkit.training.trainer import TrainingError

    try:
        yield
    except (ConfigError, DataError, CheckpointError, RunLockError) as err:
        _bad_option(str(err))
    except TrainingError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise typer.Exit(130)
    except MemoryError:
        _bad_option("out of memory; use smaller model sizes, batches or inputs")
    except RuntimeError as err:   # torch's allocator failing on sizes the config or input asked for
        if "can't allocate memory" in str(err) or "out of memory" in str(err).lower():
            _bad_option(f"out of memory ({str(err).splitlines()[0][:120]}); use smaller model sizes, batches "
                        f"or inputs")
        raise
    except OSError as err:      # writing an output the user named
        if err.filename is None:
            raise
        _bad_option(f"cannot write {err.filename}: {err.strerror}")


def _precision_option():
    return typer.Option("fp32", "--precision", help="fp32 (exact) or bf16 (autocast: faster on CPUs with "
                                                    "AVX512-BF16/AMX and on GPUs).")


def _int8_option():
    return typer.Option(False, "--int8", help="CPU: dynamic int8 quantisation of the linear and LSTM/GRU layers "
                                              "(faster; close to fp32, see the README).")


def _bad_option(message: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
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

    Ctrl-C or SIGTERM (a scheduler's preemption) finishes the current step, saves last.pt and
    exits with 130 or 143; the same command with --resume (or --auto-resume) continues exactly
    where it stopped. A run directory has one writer at a time.

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


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="A language-model checkpoint (last.pt or best.pt)."),
    prime: str = typer.Option("", "--prime", "-p", help="Text the sample starts from (echoed first)."),
    length: int = typer.Option(500, "--length", "-n", min=1, max=MAX_GENERATE,
                               help=f"Tokens to sample after the prime (at most {MAX_GENERATE:,})."),
    temperature: float = typer.Option(1.0, "--temperature", "-t",
                                      help="Softmax temperature (> 0); lower is more conservative."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample only from the k likeliest tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0,
                                          help="Sample from the smallest set of tokens with this total probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; the same seed gives the same text "
                                                            "(sample i of --num-samples uses seed + i - 1)."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="How many independent samples."),
    precision: str = _precision_option(),
    int8: bool = _int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Sample text from a language model, streaming it to stdout (a backward LM, trained with
    data.reverse, writes the text that comes before the prime, right to left).

    Example:  rnnkit generate runs/char_lm/best.pt --prime "ROMEO:" --temperature 0.8 --seed 1
    """
    import rnnkit

    with user_errors():
        m = rnnkit.load(checkpoint, device, precision, int8, note=_note)
        if m.kind != "lm":
            raise CheckpointError(f"{checkpoint}: a '{m.kind}' checkpoint cannot generate text; "
                                  f"use 'rnnkit translate' for translation models")
        out = sys.stdout
        for i in range(num_samples):
            if num_samples > 1:
                err_console.rule(f"sample {i + 1}")
            word = m.task.cfg.data.tokenizer == "word"
            pieces = m.stream(prime, length, temperature, top_k, top_p, None if seed is None else seed + i)
            out.write(prime + (" " if word and prime and not prime[-1].isspace() else ""))
            for piece in pieces:
                out.write(piece)
                out.flush()
            out.write("\n")
        out.flush()


@app.command()
def translate(
    checkpoint: Path = typer.Argument(..., help="A translation checkpoint (last.pt or best.pt)."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="Source file; default stdin."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file; default stdout."),
    beam: int = typer.Option(1, "--beam", "-b", min=1, help="Beam size; 1 is greedy decoding."),
    n_best: int = typer.Option(1, "--n-best", min=1,
                               help="Write the n best translations per line, separated by ' ||| '."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Sentences decoded together."),
    length_penalty: float = typer.Option(0.0, "--length-penalty", min=0.0,
                                         help="GNMT length penalty alpha for beam search (0: none)."),
    replace_unk: bool = typer.Option(False, "--replace-unk",
                                     help="Replace each <unk> with the source token it attends to most."),
    attention_plots: Optional[Path] = typer.Option(None, "--attention-plots", metavar="DIR",
                                                   help="Write one attention heatmap PNG per sentence here."),
    precision: str = _precision_option(),
    int8: bool = _int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Translate text, one output line per input line, in order (empty lines stay empty).

    Example:  rnnkit translate runs/en_fr/best.pt --beam 5 < input.en > output.fr
    """
    import rnnkit
    from rnnkit.data.parallel import read_lines
    from rnnkit.training import distributed

    with user_errors():
        _output_file(output, "--output")
        m = rnnkit.load(checkpoint, device, precision, int8, note=_note)
        if m.kind != "translation":
            raise CheckpointError(f"{checkpoint}: a '{m.kind}' checkpoint cannot translate; "
                                  f"use 'rnnkit generate' for language models")
        if attention_plots and m.task.cfg.model.decoder.attention == "none":
            _bad_option("--replace-unk and --attention-plots need a model with attention")
        options = dict(beam=beam, n_best=n_best, batch_size=batch_size, length_penalty=length_penalty,
                       replace_unk=replace_unk)
        m.translations([], **options)           # the options' checks, before reading any input
        if input is not None and not input.is_file():
            raise DataError(f"--input: file not found: {input}")
        if input is None and sys.stdin.isatty() and output is None and not distributed.launched():
            _interactive(m, options)
            return
        lines = read_lines(str(input)) if input is not None else sys.stdin.read().splitlines()
        rank = distributed.init()    # under torchrun: each rank translates a contiguous share
        results = _split_across_ranks(lines, rank, lambda part: m.translations(part, **options))
        distributed.finish()
        if not rank.main:
            return
    nbest = results if n_best > 1 else [[r] for r in results]
    text = "".join(" ||| ".join(t.text for t in hyps) + "\n" for hyps in nbest)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        with user_errors():
            output.write_text(text, encoding="utf-8")
    if attention_plots is not None:
        from rnnkit.plots import save_attention_plots

        written = save_attention_plots([h[0] for h in nbest], attention_plots)
        err_console.print(f"wrote {written} attention plots to {attention_plots}")


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="A tagging, classification or forecast checkpoint."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="One whitespace-tokenised sentence per line; "
                                                                      "default stdin."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file; default stdout."),
    probs: bool = typer.Option(False, "--probs", help="Classifiers: the label's probability after a tab."),
    attention: bool = typer.Option(False, "--attention",
                                   help="Classifiers with attention pooling: each word's weight, word:weight."),
    data: Optional[Path] = typer.Option(None, "--data", help="Forecasts: the CSV file whose rows the model reads."),
    at: Optional[int] = typer.Option(
        None, "--at", metavar="ROW",
        help="Forecasts: forecast rows ROW onwards from the rows before it (rows count from 0 after the header); "
             "default: the rows after the file's end."),
    every: bool = typer.Option(False, "--every", help="Forecasts: one forecast for every window the file holds."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                        help="Forecasts: draw history, forecast and truth of one column here."),
    column: Optional[str] = typer.Option(None, "--column", help="Forecasts: the column --plot draws "
                                                                "(default: the last target)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Sentences (windows) processed together."),
    precision: str = _precision_option(),
    int8: bool = _int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Tag or classify sentences, or forecast a time series.

    Taggers and classifiers: exactly one output line per input line, in order (an empty line
    gives an empty line): the tags separated by spaces, or the label. Streams batch by batch.
    Forecasters: CSV rows origin,timestamp,step,column,value,truth in original units (truth is
    empty past the file's end), for the window at --at, or at the file's end, or --every window.

    Example:  rnnkit predict runs/tagger_upos/best.pt < sentences.txt > tags.txt
    Example:  rnnkit predict runs/forecast_etth1/best.pt --data ETTh1.csv --at 14304 -o f.csv --plot ot.png
    """
    import rnnkit
    from rnnkit.tasks.classification import format_prediction

    with user_errors():
        _output_file(output, "--output")
        _output_file(plot, "--plot")
        m = rnnkit.load(checkpoint, device, precision, int8, note=_note)
        if m.kind == "forecast":
            with m.running():
                _predict_forecast(m.task, data, output, at, every, plot, column, batch_size)
            return
        if data is not None or at is not None or every or plot is not None or column is not None:
            _bad_option("--data, --at, --every, --plot and --column are for forecast checkpoints")
        if m.kind not in ("tagging", "classification"):
            raise CheckpointError(f"{checkpoint}: a '{m.kind}' checkpoint cannot predict; "
                                  f"predict takes tagging, classification and forecast models")
        if attention and getattr(m.task.cfg.model, "pooling", None) != "attention":
            _bad_option("--attention needs a classifier with model.pooling: attention")
        if m.kind == "classification":
            def show(d) -> str:
                return format_prediction(d, probs, attention)
        else:
            def show(tags) -> str:
                return " ".join(tags)
        if input is not None and not input.is_file():
            raise DataError(f"--input: file not found: {input}")
        source = open(input, encoding="utf-8") if input is not None else sys.stdin
        sink = open(output, "w", encoding="utf-8") if output is not None else sys.stdout
        try:
            from tqdm import tqdm

            bar = tqdm(desc="predict", unit="line", file=sys.stderr, leave=False,
                       disable=None if input is not None else True)   # a file read, stderr a terminal
            for lines in _chunks(source, batch_size * 16):
                sink.write("".join(show(x) + "\n" for x in m.predict(lines, batch_size)))
                sink.flush()
                bar.update(len(lines))
            bar.close()
        except UnicodeDecodeError:
            raise DataError(f"{input or 'stdin'}: input is not valid UTF-8") from None
        finally:
            if input is not None:
                source.close()
            if output is not None:
                sink.close()


def _predict_forecast(task, data: Optional[Path], output: Optional[Path], at: Optional[int], every: bool,
                      plot: Optional[Path], column: Optional[str], batch_size: int) -> None:
    import csv

    if data is None:
        _bad_option("--data FILE.csv is required to forecast")
    if column is not None and column not in task.target_names:
        _bad_option(f"--column {column!r} is not a forecast column ({', '.join(task.target_names)})")
    series, starts = task.forecast_windows(str(data), at, every)
    length = task.cfg.data.input_length
    sink = open(output, "w", newline="", encoding="utf-8") if output is not None else sys.stdout
    try:
        writer = csv.writer(sink, lineterminator="\n")
        writer.writerow(["origin", "timestamp", "step", "column", "value", "truth"])
        name, last = column or task.target_names[-1], series.times[int(starts[-1]) - 1]
        drawn = []     # the last window's forecast of the plotted column
        for row in task.predict_rows(series, starts, batch_size):
            writer.writerow(row)
            if plot is not None and row[0] == last and row[3] == name:
                drawn.append((row[1], float(row[4])))
    finally:
        if output is not None:
            sink.close()
    if plot is not None:
        from rnnkit.plots import save_forecast_plot

        save_forecast_plot(series, name, int(starts[-1]), min(length, 3 * len(drawn)), drawn, plot)
        err_console.print(f"wrote {plot}")


@app.command()
def plot(
    runs: List[Path] = typer.Argument(..., help="Run directories (each with its metrics.jsonl)."),
    metric: Optional[str] = typer.Option(None, "--metric", "-m", help="Validation metric to draw, e.g. valid_bleu "
                                                                        "(default: valid_loss)."),
    out: Path = typer.Option(Path("runs.png"), "--output", "-o", help="PNG file to write."),
) -> None:
    """Draw training loss and a validation metric against steps, several runs on one figure.

    Example:  rnnkit plot runs/en_fr runs/en_fr_gru --metric valid_bleu -o compare.png
    """
    from rnnkit.reports import plot_runs

    with user_errors():
        _output_file(out, "--output")
        drawn = plot_runs(runs, metric, out)
    err_console.print(f"wrote {out} (training loss and {drawn} of {len(runs)} run{'s' * (len(runs) > 1)})")


@app.command("runs")
def compare(
    runs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
) -> None:
    """Compare runs: task, the config keys that differ, steps, minutes, best metric and its step.

    Example:  rnnkit runs runs/*
    """
    from rich.table import Table

    from rnnkit.reports import compare_runs
    from rnnkit.training.trainer import format_number

    with user_errors():
        rows = compare_runs(runs)
    if as_json:
        print(json.dumps(rows))
        return
    table = Table()
    for col in ("run", "task", "differs", "steps", "minutes", "metric", "best", "best_step"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(*(format_number(v) if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(table)


@app.command()
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
        _output_file(out, "--output")
        if out.resolve() in {c.resolve() for c in checkpoints}:
            _bad_option(f"--output {out} is one of the checkpoints being averaged; choose another file")
        atomic_save(average_checkpoints(checkpoints), out)
    err_console.print(f"wrote {out}: the mean of {len(checkpoints)} checkpoints")


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="A checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of a table."),
) -> None:
    """Show a checkpoint's model card.

    Task, architecture, parameters, vocabulary sizes, training so far, best validation metric,
    config hash, versions, and the command that continues it.

    Example:  rnnkit info runs/en_fr/best.pt
    """
    from rnnkit.reports import model_card

    with user_errors():
        card = model_card(checkpoint)
    _print_results(card, as_json)


@data_app.command("list")
def data_list(
    to: Path = typer.Option(Path("../shared/data"), "--to", help="Where the configs expect the corpora."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
) -> None:
    """List the corpora: files, sizes, SHA-256, licence, source, and whether they are present.

    Example:  rnnkit data list
    """
    from rich.table import Table

    from rnnkit.data.corpora import CORPORA
    from rnnkit.data.fetch import status

    rows = [{"name": c.name, "status": status(c, to), "licence": c.licence, "source": c.source,
             "description": c.description,
             "files": [{"path": r, "bytes": n, "sha256": h} for r, n, h in c.files]} for c in CORPORA.values()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"corpora (status under {to})")
    for col in ("name", "status", "file", "bytes", "sha256", "licence", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        for i, f in enumerate(r["files"]):
            first = i == 0
            table.add_row(r["name"] if first else "", r["status"] if first else "", f["path"], f"{f['bytes']:,}",
                          f["sha256"][:16], r["licence"] if first else "", r["source"] if first else "")
    Console().print(table)


@data_app.command("get")
def data_get(
    name: str = typer.Argument(..., help="A corpus from 'rnnkit data list', e.g. multi30k."),
    source: Optional[str] = typer.Option(None, "--from", help="A folder laid out like ../shared/data, or a mirror "
                                                             "URL; default: the corpus's upstream address."),
    to: Path = typer.Option(Path("../shared/data"), "--to", help="Where to put it (the corpus gets its folder)."),
) -> None:
    """Fetch a corpus, verify every file's size and SHA-256, then move it into place.

    A corrupted or partial copy is refused and nothing is left where the configs read.

    Example:  rnnkit data get multi30k --from /mnt/corpora --to ../shared/data
    """
    from rnnkit.data.fetch import get

    with user_errors():
        for line in get(name, source, to):
            err_console.print(line, highlight=False)
    err_console.print(f"{name}: ready in {to / name}")


@data_app.command("info")
def data_info(store: Path = typer.Argument(..., help="A prepared store's folder (printed by 'rnnkit prepare').")
              ) -> None:
    """Show what a prepared store holds: sources and their fingerprints, settings, sizes, tokenizers.

    Example:  rnnkit data info ~/.cache/rnnkit/stores/translation-3477dbd57dcfa4a9d14c9e72f5aff4c2
    """
    from rnnkit.data.store import Store

    with user_errors():
        _print_store(Store.open(store))


@app.command()
def prepare(
    config: Path = typer.Argument(..., help="YAML config of a translation or language-model run."),
    overrides: List[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="Override a config key."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", min=1,
                                          help="Processes that tokenise (default: this machine's cores)."),
) -> None:
    """Tokenise a translation or language-model config's data once, into a prepared store.

    A store is a folder of flat token-id files that training reads instead of the corpus, in
    constant memory, in one process or on every torchrun rank. 'rnnkit train' prepares the store
    itself when it is missing; prepare by hand to do it once for many jobs (e.g. on one node,
    with RNNKIT_CACHE on a shared disk). Prints the store's folder on stdout.

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
        _print_store(store)
    print(store.path)


def _print_store(store) -> None:
    from rich.table import Table

    table = Table(show_header=False, title="prepared store")
    for what, value in store.summary():
        table.add_row(what, value)
    err_console.print(table)


@app.command()
def serve(
    checkpoints: List[str] = typer.Argument(..., metavar="CKPT...",
                                            help="Checkpoints to serve, each PATH (named after its run folder) "
                                                 "or NAME=PATH."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Sentences decoded together at most."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0,
                                      help="How long a short batch waits for more requests."),
    max_queue: int = typer.Option(1024, "--max-queue", min=1,
                                  help="Sentences waiting per model; beyond it requests get 503."),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in bytes (413 beyond)."),
    max_lines: int = typer.Option(256, "--max-lines", min=1, help="Lines per request at most."),
    max_tokens: int = typer.Option(400, "--max-tokens", min=1, help="Tokens per line at most."),
    precision: str = _precision_option(),
    int8: bool = _int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    in_process: bool = typer.Option(False, "--in-process",
                                    help="Run the models in the server's own process (by default they run in a "
                                         "process of their own, so that HTTP work does not hold them up)."),
) -> None:
    """Serve trained models over HTTP: JSON routes per model, batching of concurrent requests,
    OpenAPI docs at /docs and a page to try the models at /.

    Example:  rnnkit serve runs/en_fr/best.pt --port 8000

    Then:     curl -s localhost:8000/v1/en_fr/translate -d '{"lines": ["a man is riding a bike ."], "beam": 5}'
    """
    with user_errors():
        import uvicorn

        import rnnkit
        from rnnkit.serve import Limits, build_app, model_names

        limits = Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_body=max_body,
                        max_lines=max_lines, max_tokens=max_tokens)
        names = model_names(checkpoints)
        worker = None
        if in_process:
            models = {name: rnnkit.load(path, device=device, precision=precision, int8=int8, note=_note)
                      for name, path in names.items()}
        else:
            from rnnkit.serve_worker import ModelProcess

            worker = ModelProcess(names, device=device, precision=precision, int8=int8, note=_note)
            models = worker.models
        for name, path in names.items():
            err_console.print(f"loaded {name}: {models[name].kind} from {path}")

        def stopped(counts: dict[str, int]) -> None:
            if worker is not None:
                worker.close()
            err_console.print(f"stopped: {counts['received']} requests received, {counts['answered']} answered")

        app_ = build_app(models, limits, on_shutdown=stopped)
    err_console.print(f"serving on http://{host}:{port} (docs: /docs, try it: /)")
    uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False)


def _interactive(m, options: dict) -> None:
    """A terminal on stdin: translate each line as it is typed (Ctrl-D or an empty line at the
    start ends it)."""
    err_console.print(f"rnnkit translate: type a sentence and press Enter (Ctrl-D to quit); beam {options['beam']}",
                      highlight=False)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        result = m.translations([line], **options)[0]
        hyps = result if options["n_best"] > 1 else [result]
        print(" ||| ".join(h.text for h in hyps), flush=True)


def _note(text: str) -> None:
    err_console.print(text, highlight=False)


def _arithmetic(task, precision: str, int8: bool):
    """Inference arithmetic: fp32 as trained, bf16 under autocast, or int8 linear and LSTM/GRU layers."""
    from rnnkit.api import inference_arithmetic

    return inference_arithmetic(task, precision, int8, _note)()


def _split_across_ranks(items: list, rank, work) -> list:
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


def _chunks(stream, size: int) -> Iterator[list[str]]:
    """Lines without their line ends, ``size`` at a time."""
    chunk: list[str] = []
    for line in stream:
        chunk.append(line.rstrip("\n").rstrip("\r"))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (last.pt or best.pt)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="A file to score: text for language models, tagged sentences (the config's format) "
                             "for taggers, label<TAB>text lines for classifiers, CSV for forecasters."),
    split: Optional[str] = typer.Option(
        None, "--split", help="Forecasts: score only the windows whose targets lie in this part (train, valid "
                              "or test) of the config's data.split, applied to --data; default: every window."),
    src: Optional[Path] = typer.Option(None, "--src", help="Translation: source sentences."),
    ref: Optional[Path] = typer.Option(None, "--ref", help="Translation: reference translations, line-aligned."),
    beam: int = typer.Option(1, "--beam", "-b", min=1, help="Translation: beam size (1 is greedy)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Sentences processed together."),
    streams: int = typer.Option(16, "--streams", min=1,
                                help="Language models: the text is cut into this many streams scored side by "
                                     "side (1: one continuous stream, as the literature reports; slowest)."),
    cache: int = typer.Option(0, "--cache", min=0, metavar="N",
                              help="Word language models: also score with a continuous cache (Grave et al.) "
                                   "over the last N positions, e.g. 2000; reports perplexity with and without."),
    cache_theta: float = typer.Option(0.3, "--cache-theta", min=0.0,
                                      help="--cache: how sharply the cache prefers states like the current one."),
    cache_lambda: float = typer.Option(0.1, "--cache-lambda", min=0.0, max=1.0,
                                       help="--cache: the cache's weight in the mixture with the model."),
    gradient_flow: bool = typer.Option(
        False, "--gradient-flow",
        help="Instead: the norm of the loss's gradient with respect to the hidden state at every time step, "
             "on validation data (lm, adding, copy, translation encoder), and its decay rate per step."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                        help="With --gradient-flow: draw the curve (log scale) here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    precision: str = _precision_option(),
    int8: bool = _int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Score a checkpoint: LMs on --data (loss, perplexity, bits/char); taggers on --data (token
    accuracy; span precision, recall and F1 per type for BIO/BIOES tags); classifiers on --data
    (accuracy, macro-F1, confusion matrix); translation on --src/--ref (BLEU, chrF, perplexity);
    forecasters on --data [--split test] (MSE and MAE, standardised and in original units, beside
    the last-value and seasonal baselines); adding and copy on their test set, beside the baseline.

    Example:  rnnkit eval runs/en_fr/best.pt --src test.en --ref test.fr --beam 5 --json
    Example:  rnnkit eval runs/lm_wikitext2/best.pt --data wikitext-2/test.txt --cache 2000
    Example:  rnnkit eval runs/adding/best.pt --gradient-flow --plot flow.png
    Example:  rnnkit eval runs/forecast_etth1/best.pt --data ETTh1.csv --split test
    """
    import rnnkit
    from rnnkit.data.vocab import read_text
    from rnnkit.runs import load_task
    from rnnkit.training import distributed

    if split is not None and split not in ("train", "valid", "test"):
        _bad_option(f"--split must be train, valid or test, got {split!r}")
    if plot is not None and not gradient_flow:
        _bad_option("--plot draws the gradient-flow curve; add --gradient-flow")
    with user_errors():
        _output_file(plot, "--plot")
        if gradient_flow:            # needs the task's training data: not an inference model
            task = load_task(checkpoint, device, with_data=True)
            if not hasattr(task, "gradient_flow"):
                raise CheckpointError(f"{checkpoint}: task '{task.cfg.task}' does not measure gradient flow")
            with _arithmetic(task, precision, int8):
                _print_gradient_flow(task.gradient_flow(), plot, f"{task.cfg.task}, {checkpoint}", as_json)
            return
        m = rnnkit.load(checkpoint, device, precision, int8, note=_note)
        kind = m.kind
        if split is not None and kind != "forecast":
            _bad_option("--split is for forecast checkpoints")
        if cache and (kind != "lm" or m.task.cfg.data.tokenizer != "word"):
            _bad_option("--cache is for word-level language models")
        if kind in ("lm", "tagging", "classification", "forecast"):
            if data is None:
                _bad_option(f"--data FILE is required to evaluate a '{kind}' model")
            if not data.is_file():
                raise DataError(f"--data: file not found: {data}")
            if kind == "lm":
                results = m.score(read_text(str(data)), streams, cache, cache_theta, cache_lambda)
            elif kind == "forecast":
                results = m.score(data, split, batch_size)
            else:
                results = m.score(data, batch_size)
        elif kind == "translation":
            if src is None or ref is None:
                _bad_option("--src FILE and --ref FILE are required to evaluate a translation model")
            from rnnkit.data.parallel import read_parallel
            from rnnkit.metrics import bleu, chrf, perplexity

            sources, refs = read_parallel(str(src), str(ref))
            rank = distributed.init()    # under torchrun: each rank decodes and scores a share
            hyps = _split_across_ranks(sources, rank, lambda part: m.translate(part, beam=beam,
                                                                               batch_size=batch_size))
            with m.running():
                scored = _split_across_ranks(list(zip(sources, refs)), rank, lambda part: [
                    m.task.score_pairs([s for s, _ in part], [r for _, r in part], batch_size)] if part else [])
            tokens = sum(n for _, n in scored)
            loss = sum(v * n for v, n in scored) / max(1, tokens)
            distributed.finish()
            if not rank.main:
                return
            results = {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), "loss": loss,
                       "ppl": perplexity(loss), "sentences": len(sources), "beam": beam}
        else:   # generated tasks: the test set their seed fixes
            with m.running():
                results = m.task.evaluate_split("test")
    _print_results(results, as_json)


def _print_gradient_flow(flow, plot: Optional[Path], title: str, as_json: bool) -> None:
    if plot is not None:
        from rnnkit.plots import save_gradient_flow_plot

        save_gradient_flow_plot({title: flow}, plot)
        err_console.print(f"wrote {plot}")
    if as_json:
        print(json.dumps(flow._asdict()))
        return
    print("distance\tgrad_norm")
    for d, n in zip(flow.distances, flow.norms):
        print(f"{d}\t{n:.6g}")
    print(f"decay per step: {flow.decay:.4f}")


def _print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    from rich.table import Table

    from rnnkit.training.trainer import format_number

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


if __name__ == "__main__":
    run()
