"""``rnnkit export``: a checkpoint as ONNX graphs and a manifest, run later without torch."""
from __future__ import annotations

from pathlib import Path

import typer

from rnnkit.cli.common import err_console, note, user_errors


def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint (best.pt or last.pt) to export."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="The folder to write (new or empty; missing folders above it are made)."),
    int8: bool = typer.Option(False, "--int8", help="Quantise the matrix products and LSTM weights to int8 "
                                                    "(onnxruntime's dynamic quantisation)."),
    opset: int = typer.Option(17, "--opset", help="The ONNX opset of the graphs (13 to 20)."),
) -> None:
    """Export a checkpoint to ONNX: graphs and a manifest that onnxruntime runs without torch.

    The folder then works wherever a checkpoint does for inference: rnnkit.load(DIR), rnnkit generate | translate | predict | eval | serve DIR. Language models, sentence classifiers, taggers, forecasters and translation models export (translation as an encoder graph and a decoder-step graph; beam search runs outside them); other checkpoints get a one-line reason. Nothing is written at DIR unless the export finishes.

    Example:  rnnkit export runs/char_lm/best.pt -o exports/char_lm --int8
    """
    from rnnkit.export import export as write_export

    with user_errors():
        manifest = write_export(checkpoint, output, opset, int8, note)
    from rnnkit.runtime.manifest import graph_bytes

    graphs = ", ".join(g["file"] for g in manifest["graphs"].values())
    size = sum(graph_bytes(output, g) for g in manifest["graphs"].values()) / 1e6
    err_console.print(f"wrote {output}: {graphs} (with their weights, {size:.1f} MB) and manifest.json "
                      f"({manifest['task']}, {'int8' if int8 else 'fp32'}, opset {opset})", highlight=False)
