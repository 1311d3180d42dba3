"""Which tasks there are and the schema of each: its data and model sections and its rules.

The schemas live here, in the config layer, so that validation, the JSON Schema and the
reference need neither torch nor the task modules that build models.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from rnnkit.config import forecast, labeling, lm, memory, translation
from rnnkit.config.core import Config


class TaskSchema(NamedTuple):
    data: type
    model: type
    check: Callable[[Config], None]     # cross-field rules and file checks
    metrics: tuple[str, ...]            # what train.metric may name
    activation_regularisation: bool = False   # train.ar / train.tar apply


def _tagging(cfg: Config) -> None:
    labeling.check_files(cfg, labeling.TAGGING_METRICS)


TASKS: dict[str, TaskSchema] = {
    "lm": TaskSchema(lm.DataConfig, lm.ModelConfig, lm.check_config, lm.METRICS, True),
    "translation": TaskSchema(translation.DataConfig, translation.ModelConfig, translation.check_config,
                              translation.METRICS),
    "adding": TaskSchema(memory.AddingDataConfig, memory.ModelConfig, memory.check_adding, memory.ADDING_METRICS),
    "copy": TaskSchema(memory.CopyDataConfig, memory.CopyModelConfig, memory.check_copy, memory.COPY_METRICS),
    "tagging": TaskSchema(labeling.TaggingDataConfig, labeling.TaggingModelConfig, _tagging,
                          labeling.TAGGING_METRICS),
    "classification": TaskSchema(labeling.ClassificationDataConfig, labeling.ClassificationModelConfig,
                                 labeling.check_classification, labeling.CLASSIFICATION_METRICS),
    "forecast": TaskSchema(forecast.DataConfig, forecast.ModelConfig, forecast.check_config, forecast.METRICS),
}


def task_names() -> list[str]:
    return list(TASKS)


def task_schema(name: str) -> TaskSchema:
    return TASKS[name]
