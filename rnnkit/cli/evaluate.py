"""``rnnkit eval``: a checkpoint scored on held-out data, or its gradient flow."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rnnkit.data.vocab import DataError
from rnnkit.training.checkpoint import CheckpointError
from rnnkit.cli.common import (bad_option, check_output_file, err_console, int8_option, note,
                               precision_option, print_results, ranks, split_across_ranks, user_errors,
                               arithmetic)


def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (last.pt or best.pt), or an export folder."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="A file to score: text for language models, tagged sentences (the config's format) "
                             "for taggers, label<TAB>text lines (or documents, the config's data.format) for "
                             "classifiers, CSV for forecasters."),
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
    dynamic: bool = typer.Option(
        False, "--dynamic",
        help="Language models: also score while the model adapts to the text it reads (dynamic evaluation, "
             "Krause et al. 2018): a gradient step after every segment; static and dynamic side by side."),
    dynamic_rule: str = typer.Option("rms", "--dynamic-rule",
                                     help="--dynamic: rms (the paper's rule, with gradient statistics of the "
                                          "training text, kept beside the checkpoint) or sgd."),
    dynamic_lr: Optional[float] = typer.Option(None, "--dynamic-lr",
                                               help="--dynamic: the step size eta (default 0.002 for rms, 0.1 "
                                                    "for sgd)."),
    dynamic_decay: float = typer.Option(0.02, "--dynamic-decay",
                                        help="--dynamic: lambda, the pull back towards the trained weights."),
    dynamic_segment: int = typer.Option(5, "--dynamic-segment", min=1,
                                        help="--dynamic: tokens per update (n)."),
    dynamic_stats_tokens: int = typer.Option(500_000, "--dynamic-stats-tokens", min=1,
                                             help="--dynamic rms: training tokens the gradient statistics are "
                                                  "collected over."),
    gradient_flow: bool = typer.Option(
        False, "--gradient-flow",
        help="Instead: the norm of the loss's gradient with respect to the hidden state at every time step, "
             "on validation data (lm, adding, copy, translation encoder), and its decay rate per step."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="FILE.png",
                                        help="With --gradient-flow: draw the curve (log scale) here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    precision: str = precision_option(),
    int8: bool = int8_option(),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Score a checkpoint on held-out data, or measure how its gradients flow back through time.

    What is scored: LMs on --data (loss, perplexity, bits/char); taggers on --data (token accuracy; span precision, recall and F1 per type for BIO/BIOES tags); classifiers on --data (accuracy, macro-F1, confusion matrix); translation on --src/--ref (BLEU, chrF, perplexity); forecasters on --data [--split test] (MSE and MAE, standardised and in original units, beside the last-value and seasonal baselines); adding and copy on their test set, beside the baseline.

    Example:  rnnkit eval runs/en_fr/best.pt --src test.en --ref test.fr --beam 5 --json
    Example:  rnnkit eval runs/lm_wikitext2/best.pt --data wikitext-2/test.txt --cache 2000
    Example:  rnnkit eval runs/lm_wikitext2/best.pt --data wikitext-2/test.txt --streams 1 --dynamic
    Example:  rnnkit eval runs/adding/best.pt --gradient-flow --plot flow.png
    Example:  rnnkit eval runs/forecast_etth1/best.pt --data ETTh1.csv --split test
    """
    import rnnkit
    from rnnkit.data.vocab import read_text

    if split is not None and split not in ("train", "valid", "test"):
        bad_option(f"--split must be train, valid or test, got {split!r}")
    if plot is not None and not gradient_flow:
        bad_option("--plot draws the gradient-flow curve; add --gradient-flow")
    with user_errors():
        check_output_file(plot, "--plot")
        if gradient_flow:            # needs the task's training data: not an inference model
            if checkpoint.is_dir():
                raise CheckpointError(f"{checkpoint}: an export has no training data or gradients; "
                                      f"--gradient-flow needs the checkpoint")
            from rnnkit.runs import load_task

            task = load_task(checkpoint, device, with_data=True)
            if not hasattr(task, "gradient_flow"):
                raise CheckpointError(f"{checkpoint}: task '{task.cfg.task}' does not measure gradient flow")
            with arithmetic(task, precision, int8):
                _print_gradient_flow(task.gradient_flow(), plot, f"{task.cfg.task}, {checkpoint}", as_json)
            return
        m = rnnkit.load(checkpoint, device, precision, int8, note=note)
        kind = m.kind
        if split is not None and kind != "forecast":
            bad_option("--split is for forecast checkpoints")
        if cache and (kind != "lm" or m.task.cfg.data.tokenizer != "word"):
            bad_option("--cache is for word-level language models")
        settings = None
        if dynamic:
            if kind != "lm":
                bad_option(f"--dynamic is for language models; {checkpoint} is a '{kind}' model")
            from rnnkit.tasks.dynamic import Dynamic

            settings = Dynamic(dynamic_rule, dynamic_lr, dynamic_decay, segment=dynamic_segment,
                               stats_tokens=dynamic_stats_tokens).check()
        if kind in ("lm", "tagging", "classification", "forecast"):
            if data is None:
                bad_option(f"--data FILE is required to evaluate a '{kind}' model")
            if not data.is_file():
                raise DataError(f"--data: file not found: {data}")
            if kind == "lm":
                results = m.score(read_text(str(data)), streams, cache, cache_theta, cache_lambda, settings, note)
            elif kind == "forecast":
                results = m.score(data, split, batch_size)
            else:
                results = m.score(data, batch_size)
        elif kind == "translation":
            if src is None or ref is None:
                bad_option("--src FILE and --ref FILE are required to evaluate a translation model")
            from rnnkit.data.vocab import read_parallel
            from rnnkit.metrics import bleu, chrf, perplexity

            sources, refs = read_parallel(str(src), str(ref))
            with ranks(m) as rank:    # under torchrun: each rank decodes and scores a share
                hyps = split_across_ranks(sources, rank, lambda part: m.translate(part, beam=beam,
                                                                                   batch_size=batch_size))
                with m.running():
                    scored = split_across_ranks(list(zip(sources, refs)), rank, lambda part: [
                        m.task.score_pairs([s for s, _ in part], [r for _, r in part], batch_size)] if part else [])
            tokens = sum(n for _, n in scored)
            loss = sum(v * n for v, n in scored) / max(1, tokens)
            if not rank.main:
                return
            results = {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), "loss": loss,
                       "ppl": perplexity(loss), "sentences": len(sources), "beam": beam}
        else:   # generated tasks: the test set their seed fixes
            with m.running():
                results = m.task.evaluate_split("test")
    print_results(results, as_json)


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
