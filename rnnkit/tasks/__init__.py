"""Tasks: each module turns a config into data, a model, a loss, metrics and inference.

Every task is registered once, in ``rnnkit.config.tasks``, which names its module here; the
module provides ``build(cfg, device, extras=None, with_data=True)`` returning an object the
Trainer can drive, and re-exports its ``DataConfig`` and ``ModelConfig``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from rnnkit.config.tasks import TASKS, task_names


def task_module(name: str) -> ModuleType:
    return importlib.import_module(TASKS[name].module)


__all__ = ["task_module", "task_names"]
