"""The YOLO model family, registered with nam-prune through the ``nam_prune.families`` entry point.

Importing this module does not import ultralytics: each hook loads it when a YOLO model is used.
"""

from __future__ import annotations

import torch.nn as nn

from nam_prune.models import ModelFamily, ModelSpec
from nam_prune.prune.graph import StandIns
from nam_prune.yolo.config import YoloConfig


def is_yolo_name(name: str) -> bool:
    """Model names handed to ultralytics: a model yaml (``yolov8n.yaml``) or an ultralytics checkpoint."""
    return name.endswith((".yaml", ".yml", ".pt"))


def _build(spec: ModelSpec) -> nn.Module:
    from nam_prune.yolo.models import build_yolo

    return build_yolo(spec.name, spec.num_classes, spec.in_channels, spec.config)


def _stand_ins() -> StandIns:
    from nam_prune.yolo.models import attention_stand_ins

    return attention_stand_ins()


def _task() -> type:
    from nam_prune.yolo.task import DetectionTask

    return DetectionTask


def _commands() -> list:
    from nam_prune.yolo.commands import train_detector

    return [train_detector]


FAMILY = ModelFamily(
    "yolo", is_yolo_name, _build, section=("yolo", YoloConfig), trace_stand_ins=_stand_ins, task=_task,
    commands=_commands,
)
