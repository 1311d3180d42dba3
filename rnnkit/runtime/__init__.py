"""Trained models exported to ONNX, run with onnxruntime and numpy alone (no torch).

``manifest`` reads and checks an export folder, ``language_model`` runs a language model's
step graph, ``classifier`` a sentence classifier's, ``tagger`` a tagger's (its CRF decoded
in numpy), ``forecaster`` a forecaster's, ``translator`` a translation model's encoder and
decoder step (beam search runs in numpy). :func:`load_export` gives the object ``rnnkit.load`` wraps, as the torch task
objects are wrapped for a checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rnnkit.config.tasks import TASKS, resolve
from rnnkit.runtime.manifest import MANIFEST, is_export, read_manifest


def load_export(folder: str | Path) -> Any:
    """The runtime object for an export folder (checked against its manifest)."""
    manifest = read_manifest(folder)          # refuses a task without a runtime
    return resolve(TASKS[manifest["task"]].runtime)(Path(folder), manifest)


__all__ = ["MANIFEST", "is_export", "load_export", "read_manifest"]
