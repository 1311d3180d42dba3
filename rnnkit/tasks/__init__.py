"""Tasks: each module turns a config into data, a model, a loss, metrics and inference.

A task's config sections and rules live in the config layer (``rnnkit.config.tasks``); its
module here provides ``build(cfg, device, extras=None, with_data=True)`` returning an object
the Trainer can drive, and re-exports its ``DataConfig`` and ``ModelConfig``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from rnnkit.config.tasks import task_names

_MODULES = {
    "lm": "rnnkit.tasks.language_model",
    "translation": "rnnkit.tasks.translation",
    "adding": "rnnkit.tasks.adding",
    "copy": "rnnkit.tasks.copying",
    "tagging": "rnnkit.tasks.tagging",
    "classification": "rnnkit.tasks.classification",
    "forecast": "rnnkit.tasks.forecast",
}


def task_module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


__all__ = ["task_module", "task_names"]
