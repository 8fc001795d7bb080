"""The ``yolo:`` recipe section (kept free of ultralytics imports so recipes validate without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nam_prune.config import bounded


@dataclass
class YoloConfig:
    """The ``yolo:`` section of a detector recipe.

    data: an ultralytics data yaml; ``demo`` (two photos shipped with ultralytics, plumbing
        only); or ``fashion-detect`` (the derived offline set of ``nam-prune data fashion-detect``:
        2,000 canvases of ``imgsz`` px, seed 0, written into the run folder).
    scope: where NAM gates go and what is pruned: ``backbone`` or ``backbone+neck``.
    imgsz: training and validation image size. report_imgsz: size at which GFLOPs and
        latency are reported. batch, workers, amp: as in ultralytics (AMP only acts on CUDA).
    warmup_epochs: ultralytics' learning-rate warm-up of the stage that trains the model as built
        (``run``'s sparsity stage, ``compare``'s first; its default 3 suits long runs only);
        fine-tuning a trained model starts without one.
    close_mosaic: ultralytics' epochs at the end of each stage trained without mosaic images.
    """

    data: str = "demo"
    scope: Literal["backbone", "backbone+neck"] = "backbone"
    imgsz: int = bounded(640, low=32)
    report_imgsz: int = bounded(640, low=32)
    batch: int = bounded(16, low=1)
    workers: int = bounded(0, low=0)
    amp: bool = True
    warmup_epochs: float = bounded(0.0, low=0)
    close_mosaic: int = bounded(10, low=0)
