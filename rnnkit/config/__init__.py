"""Typed, validated configuration: YAML files and ``--set`` overrides become dataclasses.

``core`` holds the shared sections and helpers, one module per task family holds that task's
data and model sections, ``tasks`` maps task names to them, ``loading`` parses and validates,
``schema`` turns the same dataclasses into a JSON Schema and the reference pages. Nothing here
imports torch.
"""
from rnnkit.config.core import (MAX_DIM, MAX_LAYERS, MAX_VOCAB, Config, ConfigError, RecurrentConfig,
                                TeacherForcingConfig, TrainConfig, check_metric, check_recurrent, num,
                                recurrent_options, require_file)
from rnnkit.config.loading import build_section, config_to_dict, load_config, save_config
from rnnkit.config.tasks import TASKS, task_names, task_schema

__all__ = ["MAX_DIM", "MAX_LAYERS", "MAX_VOCAB", "Config", "ConfigError", "RecurrentConfig", "TeacherForcingConfig",
           "TrainConfig", "check_metric", "check_recurrent", "num", "recurrent_options", "require_file",
           "build_section", "config_to_dict", "load_config", "save_config", "TASKS", "task_names", "task_schema"]
