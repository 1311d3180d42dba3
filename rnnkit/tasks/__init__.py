"""Tasks: each module turns a config into data, a model, a loss, metrics and inference.

A task module provides ``DataConfig``, ``ModelConfig``, ``check_config(cfg)`` and
``build(cfg, device, extras=None)`` returning an object the Trainer can drive.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "lm": "rnnkit.tasks.language_model",
    "translation": "rnnkit.tasks.translation",
    "adding": "rnnkit.tasks.adding",
    "copy": "rnnkit.tasks.copying",
    "tagging": "rnnkit.tasks.tagging",
    "classification": "rnnkit.tasks.classification",
    "forecast": "rnnkit.tasks.forecast",
}


def task_names() -> list[str]:
    return list(_MODULES)


def task_module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def task_schema(name: str) -> tuple[type, type]:
    mod = task_module(name)
    return mod.DataConfig, mod.ModelConfig
