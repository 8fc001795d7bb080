"""ultralytics YOLO detectors in the nam-prune pipeline (needs ``pip install 'nam-prune[yolo]'``).

Importing this package does not import ultralytics; the names below load it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from nam_prune.yolo.config import YoloConfig

_LAZY = {
    "NAMDetectionTrainer": "nam_prune.yolo.train",
    "build_yolo": "nam_prune.yolo.models",
    "make_split_free": "nam_prune.yolo.models",
    "C2fSplitFree": "nam_prune.yolo.models",
    "build_demo_set": "nam_prune.yolo.data",
    "DetectionTask": "nam_prune.yolo.task",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nam_prune.yolo' has no attribute {name!r}")


__all__ = ["YoloConfig", *_LAZY]
