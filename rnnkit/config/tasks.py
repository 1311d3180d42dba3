"""Every task rnnkit runs, registered once: its config schema and rules, the torch module
that builds it, the object ``rnnkit.load`` returns for it, the runtime that runs its export,
the function that exports it, the route ``rnnkit serve`` answers it on and what a live
stream of it is fed. Adding a task is adding an entry here (``docs/architecture.md``).

It lives in the config layer and names code by import path (``module:attribute``), so that
validation, the JSON Schema, the reference and the torch-free runtime read it without
importing torch or a task module.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple, Optional

from rnnkit.config import forecast, labeling, lm, memory, translation
from rnnkit.config.core import Config


class Task(NamedTuple):
    data: type                          # the data section's dataclass
    model: type                         # the model section's dataclass
    check: Callable[[Config], None]     # cross-field rules and file checks
    metrics: tuple[str, ...]            # what train.metric may name
    module: str                         # the torch task: a module with build(cfg, device, extras, with_data)
    api: str = "rnnkit.api:Model"       # the object rnnkit.load returns for a checkpoint or an export
    runtime: Optional[str] = None       # the onnxruntime class that runs an export; None: no export
    exporter: Optional[str] = None      # the function writing the export's graphs
    route: Optional[str] = None         # rnnkit serve's POST /v1/{model}/{route}
    streams: Optional[str] = None       # what a live stream is fed ("text", "rows"); None: no streams
    no_streams: str = ""                # why not, in one line, where it has none
    activation_regularisation: bool = False   # train.ar / train.tar apply


def _tagging(cfg: Config) -> None:
    labeling.check_files(cfg, labeling.TAGGING_METRICS)


_BIDIRECTIONAL = ("its encoder is bidirectional: the backward direction reads the whole sentence before the "
                  "first answer")

TASKS: dict[str, Task] = {
    "lm": Task(lm.DataConfig, lm.ModelConfig, lm.check_config, lm.METRICS, "rnnkit.tasks.language_model",
               api="rnnkit.api:LanguageModel", runtime="rnnkit.runtime.language_model:OnnxLanguageModel",
               exporter="rnnkit.export.graphs:language_model", route="generate", streams="text",
               activation_regularisation=True),
    "translation": Task(translation.DataConfig, translation.ModelConfig, translation.check_config,
                        translation.METRICS, "rnnkit.tasks.translation", api="rnnkit.api:Translator",
                        runtime="rnnkit.runtime.translator:OnnxTranslator", exporter="rnnkit.export.graphs:translator",
                        route="translate",
                        no_streams="a translation reads the whole source sentence before its first word"),
    "adding": Task(memory.AddingDataConfig, memory.ModelConfig, memory.check_adding, memory.ADDING_METRICS,
                   "rnnkit.tasks.adding", no_streams="the adding problem reads a whole sequence"),
    "copy": Task(memory.CopyDataConfig, memory.CopyModelConfig, memory.check_copy, memory.COPY_METRICS,
                 "rnnkit.tasks.copying", no_streams="the copy task reads a whole sequence"),
    "tagging": Task(labeling.TaggingDataConfig, labeling.TaggingModelConfig, _tagging, labeling.TAGGING_METRICS,
                    "rnnkit.tasks.tagging", api="rnnkit.api:Tagger", runtime="rnnkit.runtime.tagger:OnnxTagger",
                    exporter="rnnkit.export.graphs:tagger", route="predict", no_streams=_BIDIRECTIONAL),
    "classification": Task(labeling.ClassificationDataConfig, labeling.ClassificationModelConfig,
                           labeling.check_classification, labeling.CLASSIFICATION_METRICS,
                           "rnnkit.tasks.classification", api="rnnkit.api:Classifier",
                           runtime="rnnkit.runtime.classifier:OnnxClassifier",
                           exporter="rnnkit.export.graphs:classifier", route="predict", no_streams=_BIDIRECTIONAL),
    "forecast": Task(forecast.DataConfig, forecast.ModelConfig, forecast.check_config, forecast.METRICS,
                     "rnnkit.tasks.forecast", api="rnnkit.api:Forecaster",
                     runtime="rnnkit.runtime.forecaster:OnnxForecaster", exporter="rnnkit.export.graphs:forecaster",
                     route="forecast", streams="rows"),
}


def task_names() -> list[str]:
    return list(TASKS)


def task_schema(name: str) -> Task:
    return TASKS[name]


def exportable_tasks() -> tuple[str, ...]:
    """The tasks with an export and a runtime to run it."""
    return tuple(name for name, t in TASKS.items() if t.runtime)


def resolve(path: str) -> Any:
    """The object an entry names (``module:attribute``), imported now."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
