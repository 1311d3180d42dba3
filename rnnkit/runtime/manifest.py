"""An export folder: ``manifest.json`` beside the ONNX graphs it names.

The manifest holds everything inference needs besides the graphs: the task, the resolved
config, the vocabulary, the model card, the graphs with their inputs and outputs, and the
format version. Any problem with a folder is a one-line :class:`CheckpointError`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rnnkit.config.tasks import exportable_tasks
from rnnkit.training.checkpoint import CheckpointError, check_format

MANIFEST = "manifest.json"
PREPACK_VARIABLE = "RNNKIT_ORT_PREPACK"   # 1: onnxruntime packs weights for its kernels (faster, more memory)
FILE_KEY = "$file"                 # in the manifest's extras: bytes kept in a file beside it
FORMAT_NAME, FORMAT_VERSION = "rnnkit-export", 1
FORMAT = f"{FORMAT_NAME}-{FORMAT_VERSION}"
EXPORTABLE = exportable_tasks()      # tasks with graphs and a runtime


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is meant as an export: a folder (a checkpoint is a file)."""
    return Path(path).is_dir()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The checked manifest of an export folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an rnnkit export (no {MANIFEST}; 'rnnkit export' writes one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: damaged (not JSON); export the checkpoint again") from None
    check_format(path, manifest, FORMAT_NAME, FORMAT_VERSION, "export")
    for key in ("task", "config", "extras", "graphs"):
        if key not in manifest:
            raise CheckpointError(f"{path}: an incomplete manifest (no {key})")
    if manifest["task"] not in EXPORTABLE:
        raise CheckpointError(f"{path}: an export of task {manifest['task']!r}, which this rnnkit cannot run "
                              f"(it runs {', '.join(EXPORTABLE)})")
    for name, graph in manifest["graphs"].items():
        for file in (graph["file"], *([graph["weights"]] if graph.get("weights") else [])):
            if not (folder / file).is_file():
                raise CheckpointError(f"{folder}: graph {name!r} ({file}) is missing; export the checkpoint again")
    manifest["extras"] = _inline_files(folder, manifest["extras"])
    return manifest


def outline_files(folder: Path, extras: Any, path: tuple[str, ...] = ()) -> Any:
    """``extras`` for the manifest: each bytes value (a sentencepiece model) written to a file
    of its own in ``folder``, named after its keys (``src.model``), and named in its place."""
    if isinstance(extras, bytes):
        name = ".".join(path)
        (folder / name).write_bytes(extras)
        return {FILE_KEY: name}
    if isinstance(extras, dict):
        return {k: outline_files(folder, v, (*path, str(k))) for k, v in extras.items()}
    return extras


def _inline_files(folder: Path, extras: Any) -> Any:
    """The inverse of :func:`outline_files`: the files' bytes back in their places."""
    if isinstance(extras, dict) and set(extras) == {FILE_KEY}:
        path = folder / str(extras[FILE_KEY])
        if not path.is_file():
            raise CheckpointError(f"{folder}: {path.name} is missing; export the checkpoint again")
        return path.read_bytes()
    if isinstance(extras, dict):
        return {k: _inline_files(folder, v) for k, v in extras.items()}
    return extras


def graph_bytes(folder: Path, graph: dict[str, Any]) -> int:
    """The size on disk of a graph: its structure and its weights file."""
    return sum((folder / f).stat().st_size for f in (graph["file"], graph.get("weights")) if f)


def open_graph(folder: Path, graph: dict[str, Any]) -> Any:
    """An onnxruntime session of ``graph``, checked against the inputs and outputs the manifest names."""
    import onnxruntime as ort

    path = folder / graph["file"]
    options = ort.SessionOptions()
    options.log_severity_level = 3        # errors only: its warnings are about its own graph rewrites
    # threads that spin between runs take the cores from the numpy work between steps (the
    # search's books, the next batch): beam search ran 1.4x faster with them asleep
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if os.environ.get(PREPACK_VARIABLE, "") != "1":
        # weights once in memory, mapped from the weights file, not again in a packed copy
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:      # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable ONNX graph ({first})") from None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != graph["inputs"] or outputs != graph["outputs"]:
        raise CheckpointError(f"{path}: the graph does not match its manifest (inputs {inputs}, outputs {outputs}; "
                              f"the manifest says {graph['inputs']}, {graph['outputs']})")
    return session
