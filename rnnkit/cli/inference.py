"""``rnnkit generate``, ``translate`` and ``predict``: a trained model on new input."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Optional

import typer

from rnnkit.data.vocab import DataError
from rnnkit.training.checkpoint import CheckpointError
from rnnkit.cli.common import (MAX_GENERATE, bad_option, check_output_file, err_console, int8_option, note,
                               precision_option, ranks, split_across_ranks, under_torchrun, user_errors)


def generate(
    checkpoint: Path = typer.Argument(..., help="A language-model checkpoint (last.pt or best.pt), or its export folder."),
    prime: str = typer.Option("", "--prime", "-p", help="Text the sample starts from (echoed first)."),
    length: int = typer.Option(500, "--length", "-n", min=1, max=MAX_GENERATE,
                               help=f"Tokens to sample after the prime (at most {MAX_GENERATE:,})."),
    temperature: float = typer.Option(1.0, "--temperature", "-t",
                                      help="Softmax temperature (> 0); lower is more conservative."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample only from the k likeliest tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", min=0.0, max=1.0,
                                          help="Sample from the smallest set of tokens with this total probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; the same seed gives the same text "
                                                            "with the same backend: a checkpoint and its export "
                                                            "sample differently (sample i of --num-samples uses "
                                                            "seed + i - 1)."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="How many independent samples."),
    dynamic: bool = typer.Option(False, "--dynamic",
                                 help="Adapt to the prime first (dynamic evaluation: a gradient step per segment "
                                      "of it, as rnnkit eval --dynamic does), then sample; a checkpoint only."),
    dynamic_rule: str = typer.Option("rms", "--dynamic-rule", help="--dynamic: rms or sgd."),
    dynamic_lr: Optional[float] = typer.Option(None, "--dynamic-lr",
                                               help="--dynamic: the step size (default 0.002 rms, 0.1 sgd)."),
    precision: str = precision_option(),
    int8: bool = int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Sample text from a language model, streaming it to stdout.

    A backward LM (trained with data.reverse) writes the text that comes before the prime, right to left.

    Example:  rnnkit generate runs/char_lm/best.pt --prime "ROMEO:" --temperature 0.8 --seed 1
    """
    import rnnkit

    with user_errors():
        m = rnnkit.load(checkpoint, device, precision, int8, note=note)
        if m.kind != "lm":
            raise CheckpointError(f"{checkpoint}: a '{m.kind}' checkpoint cannot generate text; "
                                  f"use 'rnnkit translate' for translation models")
        import contextlib

        adapting = contextlib.nullcontext()
        if dynamic:
            from rnnkit.tasks.dynamic import Dynamic

            adapting = m.adapted(prime, Dynamic(dynamic_rule, dynamic_lr).check(), note)
        out = sys.stdout
        with adapting:
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


def translate(
    checkpoint: Path = typer.Argument(..., help="A translation checkpoint (last.pt or best.pt), or its export folder."),
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
    precision: str = precision_option(),
    int8: bool = int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Translate text, one output line per input line, in order (empty lines stay empty).

    Example:  rnnkit translate runs/en_fr/best.pt --beam 5 < input.en > output.fr
    """
    import rnnkit
    from rnnkit.data.vocab import read_lines

    with user_errors():
        check_output_file(output, "--output")
        m = rnnkit.load(checkpoint, device, precision, int8, note=note)
        if m.kind != "translation":
            raise CheckpointError(f"{checkpoint}: a '{m.kind}' checkpoint cannot translate; "
                                  f"use 'rnnkit generate' for language models")
        if attention_plots and m.task.cfg.model.decoder.attention == "none":
            bad_option("--replace-unk and --attention-plots need a model with attention")
        options = dict(beam=beam, n_best=n_best, batch_size=batch_size, length_penalty=length_penalty,
                       replace_unk=replace_unk)
        m.translations([], **options)           # the options' checks, before reading any input
        if input is not None and not input.is_file():
            raise DataError(f"--input: file not found: {input}")
        if input is None and sys.stdin.isatty() and output is None and not under_torchrun():
            _interactive(m, options)
            return
        lines = read_lines(str(input)) if input is not None else sys.stdin.read().splitlines()
        with ranks(m) as rank:    # under torchrun: each rank translates a contiguous share
            results = split_across_ranks(lines, rank, lambda part: m.translations(part, **options))
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


def predict(
    checkpoint: Path = typer.Argument(..., help="A tagging, classification or forecast checkpoint, or its export folder."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="One whitespace-tokenised sentence per line "
                                                                      "(document classifiers: one JSON Lines "
                                                                      "document per line); default stdin."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file; default stdout."),
    probs: bool = typer.Option(False, "--probs", help="Classifiers: the label's probability after a tab."),
    attention: bool = typer.Option(False, "--attention",
                                   help="Classifiers with attention (pooling: attention, or hierarchical): each word's "
                                        "weight, shaded on a terminal, word:weight when piped (documents: each "
                                        "sentence's weight, then its words')."),
    hops: bool = typer.Option(False, "--hops", help="With --attention, classifiers with attention hops: each hop's "
                                                    "weights after the mean's."),
    attention_html: Optional[Path] = typer.Option(None, "--attention-html", metavar="FILE.html",
                                                  help="Classifiers with attention: write a page of the inputs with "
                                                       "their words shaded by weight."),
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
    precision: str = precision_option(),
    int8: bool = int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Tag or classify sentences, or forecast a time series.

    Taggers and classifiers: exactly one output line per input line, in order (an empty line gives an empty line): the tags separated by spaces, or the label (document classifiers read one JSON Lines document a line). --attention shows each word's weight: shaded on a terminal, word:weight when piped; --attention-html writes a page of them. Streams batch by batch. Forecasters: CSV rows origin,timestamp,step,column,value,truth in original units (truth is empty past the file's end), for the window at --at, or at the file's end, or --every window.

    Example:  rnnkit predict runs/tagger_upos/best.pt < sentences.txt > tags.txt
    Example:  rnnkit predict runs/sentiment/best.pt --attention --attention-html attention.html < dev.txt
    Example:  rnnkit predict runs/forecast_etth1/best.pt --data ETTh1.csv --at 14304 -o f.csv --plot ot.png
    """
    import rnnkit
    from rnnkit.tasks.classifier_text import format_prediction

    with user_errors():
        check_output_file(output, "--output")
        check_output_file(plot, "--plot")
        m = rnnkit.load(checkpoint, device, precision, int8, note=note)
        if m.kind == "forecast":
            with m.running():
                _predict_forecast(m.task, data, output, at, every, plot, column, batch_size)
            return
        if data is not None or at is not None or every or plot is not None or column is not None:
            bad_option("--data, --at, --every, --plot and --column are for forecast checkpoints")
        if m.kind not in ("tagging", "classification"):
            raise CheckpointError(f"{checkpoint}: a '{m.kind}' checkpoint cannot predict; "
                                  f"predict takes tagging, classification and forecast models")
        model_cfg = m.task.cfg.model
        attends = getattr(model_cfg, "pooling", None) == "attention" or getattr(model_cfg, "hierarchical", False)
        if (attention or hops or attention_html) and not attends:
            bad_option("--attention, --hops and --attention-html need a classifier with model.pooling: attention "
                       "or model.hierarchical: true")
        if hops and getattr(model_cfg, "attention_hops", 1) == 1:
            bad_option("--hops needs a classifier with model.attention_hops above 1")
        check_output_file(attention_html, "--attention-html")
        shown: list = []
        shade = attention and output is None and sys.stdout.isatty()
        if m.kind == "classification":
            def show(d) -> str:
                return format_prediction(d, probs, attention, hops and attention)
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
                found = m.predict(lines, batch_size)
                if attention_html is not None:
                    shown += zip(lines, found)
                if shade:
                    _print_shaded(found, probs, hops)
                else:
                    sink.write("".join(show(x) + "\n" for x in found))
                    sink.flush()
                bar.update(len(lines))
            bar.close()
            if attention_html is not None:
                from rnnkit.cli.attention_view import write_html

                write_html(attention_html, [x[0] for x in shown], [x[1] for x in shown], f"Attention: {checkpoint}")
                err_console.print(f"wrote {attention_html}", highlight=False, soft_wrap=True, markup=False)
        except UnicodeDecodeError:
            raise DataError(f"{input or 'stdin'}: input is not valid UTF-8") from None
        finally:
            if input is not None:
                source.close()
            if output is not None:
                sink.close()


def _print_shaded(entries: list, probs: bool, hops: bool) -> None:
    """Entries with their words shaded by weight, on the terminal."""
    from rich.console import Console

    from rnnkit.cli.attention_view import terminal_lines

    console = Console(highlight=False, soft_wrap=True)
    for d in entries:
        for line in terminal_lines(d, probs, hops):
            console.print(line)


def _predict_forecast(task, data: Optional[Path], output: Optional[Path], at: Optional[int], every: bool,
                      plot: Optional[Path], column: Optional[str], batch_size: int) -> None:
    import csv

    if data is None:
        bad_option("--data FILE.csv is required to forecast")
    if column is not None and column not in task.target_names:
        bad_option(f"--column {column!r} is not a forecast column ({', '.join(task.target_names)})")
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
