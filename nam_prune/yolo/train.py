"""Stages 2 and 5 for detectors: sparsity training and fine-tuning through ultralytics' own trainer.

:class:`NAMDetectionTrainer` is ultralytics' ``DetectionTrainer`` with two changes:

* ``get_model`` keeps the model it is given. ultralytics rebuilds every model from its
  yaml before training, which would silently turn a pruned model back into a dense one
  (loading only the weights whose shapes still match).
* ``optimizer_step`` adds the NAM penalty ``p * sign(gamma)`` to the gate gradients after
  the AMP gradient scaler has unscaled them, so ``p`` means the same with and without AMP.

To train a pruned checkpoint further with ultralytics' API::

    YOLO("runs/yolov8n_backbone_neck/model_ultralytics.pt").train(data="my.yaml", trainer=NAMDetectionTrainer)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError
from nam_prune.export import ort_session
from nam_prune.gates import set_gate_opening
from nam_prune.int8 import fixed_batch, fixed_batch_parts
from nam_prune.sparsity import Scales, apply_sparsity_penalty, clamp_scales, gamma_stats, gate_scales
from nam_prune.train import TrainConfig
from nam_prune.yolo.config import YoloConfig
from nam_prune.yolo.models import ultralytics_module

ultralytics_module()  # a one-line error, not an ImportError, when ultralytics is missing
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator  # noqa: E402


def _unwrap(model: nn.Module) -> nn.Module:
    """The detector being trained: out of DDP, and out of ultralytics' distillation wrapper (whose
    teacher is neither penalised nor kept)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "student_model", model)


class NAMDetectionTrainer(DetectionTrainer):
    """ultralytics' detection trainer for NAM-gated and pruned models (see the module docstring)."""

    sparsity: TrainConfig | None = None  # set on the instance: its penalty, regularizer and t; None trains plainly
    penalised: Scales = staticmethod(gate_scales)  # which scales the penalty acts on (BN gammas for slimming)

    def get_model(self, cfg=None, weights=None, verbose=True):
        if isinstance(weights, nn.Module):
            classes = weights.model[-1].nc
            if classes != self.data["nc"]:
                raise NamPruneError(
                    f"the model detects {classes} classes but the data yaml has {self.data['nc']}; "
                    "prune a model built for this data set"
                )
            return weights
        return super().get_model(cfg, weights, verbose)

    def build_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """ultralytics' optimizer, with the penalised scales in a group of their own at ``scale_lr`` times its rate."""
        optimizer = super().build_optimizer(*args, **kwargs)
        sparsity = self.sparsity
        if sparsity is None or not sparsity.scales_own_lr:
            return optimizer
        scales = self.penalised(_unwrap(self.model))
        ids = {id(scale) for scale in scales}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        bn_group = next(g for g in optimizer.param_groups if g.get("param_group") == "bn")
        optimizer.add_param_group({**{k: v for k, v in bn_group.items() if k != "params"}, "params": scales,
                                   "lr": bn_group["lr"] * sparsity.scale_lr, "param_group": "penalised scales"})
        return optimizer

    def optimizer_step(self):
        """ultralytics' step (unscale, clip, step, EMA) with the NAM penalty added after unscaling."""
        self.scaler.unscale_(self.optimizer)
        sparsity = self.sparsity if self.sparsity is not None and self.sparsity.penalty else None
        if sparsity is not None:
            apply_sparsity_penalty(
                _unwrap(self.model), sparsity.penalty, self.penalised, sparsity.regularizer, sparsity.polarization_t
            )
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if sparsity is not None and sparsity.regularizer == "polarization":
            clamp_scales(_unwrap(self.model), self.penalised)
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)


def ultralytics_device(device: torch.device) -> str:
    """ultralytics names devices ``cpu`` or by CUDA index."""
    return "cpu" if device.type == "cpu" else str(device.index or 0)


@contextlib.contextmanager
def ultralytics_output(log_file: Path) -> Iterator[None]:
    """ultralytics' argument dumps, per-epoch lines and progress bars go to ``log_file`` (the run
    folder's ``ultralytics.log``) so the console shows nam-prune's own progress and tables; with
    ``-v`` they stay on the console."""
    if logging.getLogger("nam_prune").isEnabledFor(logging.DEBUG):
        yield
        return
    logger = logging.getLogger("ultralytics")
    handlers = logger.handlers[:]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as stream:
        logger.handlers = [logging.StreamHandler(stream)]
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            logger.handlers = handlers


ULTRALYTICS_DISTILL_WEIGHT = 6.0  # ultralytics' default ``dis``


def trainer_overrides(
    config: TrainConfig, yolo: YoloConfig, data_yaml: Path, device: torch.device, folder: Path, stage: str, seed: int,
    warm_up: bool,
) -> dict[str, Any]:
    """ultralytics ``train`` arguments for one stage of a recipe (the model itself is handed over in
    memory); ``warm_up`` for the stage that trains the model as built (a trained model needs none)."""
    return {
        "model": "nam-prune",  # a label: NAMDetectionTrainer is given the model object
        "data": str(data_yaml),
        "epochs": config.epochs,
        "imgsz": yolo.imgsz,
        "batch": yolo.batch,
        "workers": yolo.workers,
        "device": ultralytics_device(device),
        "optimizer": {"sgd": "SGD", "adamw": "AdamW"}[config.optimizer],
        "lr0": config.lr,
        "lrf": 1.0 if config.schedule == "constant" else 0.01,
        "cos_lr": config.schedule == "cosine",
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "warmup_epochs": yolo.warmup_epochs if warm_up else 0.0,
        "close_mosaic": yolo.close_mosaic,
        # ultralytics' own distillation: the head's inputs and outputs, weighted by the teacher's scores
        "distill_model": str(Path(config.teacher).resolve()) if config.teacher else None,
        "dis": ULTRALYTICS_DISTILL_WEIGHT * config.distill,
        "amp": yolo.amp,
        "seed": seed,
        "deterministic": True,
        "project": str(folder.resolve()),
        "name": stage,
        "exist_ok": True,
        "plots": False,
        "verbose": False,
    }


@dataclass
class StageLog:
    epochs: int
    metrics: dict[str, float]
    near_zero_gammas: int


def _open_gates_while_training(trainer: DetectionTrainer, config: TrainConfig) -> None:
    """Raise the gates' opening before every batch (``TrainConfig.gate_opening``), in the trained model
    and in its EMA copy, which ultralytics validates and keeps."""
    batches_this_epoch = 0

    def count_epoch(trainer: DetectionTrainer) -> None:
        nonlocal batches_this_epoch
        batches_this_epoch = 0

    def open_gates(trainer: DetectionTrainer) -> None:
        nonlocal batches_this_epoch
        batches = len(trainer.train_loader)
        opening = config.gate_opening(trainer.epoch * batches + batches_this_epoch, batches)
        batches_this_epoch += 1
        for model in (trainer.model, trainer.ema.ema if trainer.ema is not None else None):
            if model is not None:
                set_gate_opening(_unwrap(model), opening)

    trainer.add_callback("on_train_epoch_start", count_epoch)
    trainer.add_callback("on_train_batch_start", open_gates)


def detector_sparsity(config: TrainConfig) -> TrainConfig:
    """``config`` with ``regularizer: auto`` made polarization: every detector figure was measured with it."""
    return replace(config, regularizer="polarization") if config.regularizer == "auto" else config


def train_detector(
    model: nn.Module, overrides: dict[str, Any], config: TrainConfig, penalised: Scales = gate_scales
) -> StageLog:
    """Train ``model`` in place with ultralytics (EMA weights kept, as ultralytics deploys them)."""
    trainer = NAMDetectionTrainer(overrides=overrides)
    trainer.sparsity = detector_sparsity(config)
    trainer.penalised = penalised
    trainer.model = model
    if config.open_gates:
        _open_gates_while_training(trainer, config)
    trainer.train()
    trained = trainer.ema.ema if trainer.ema is not None else trainer.model
    for wrapper in (trainer.model, trained):
        if hasattr(wrapper, "_remove_feature_hooks"):  # distillation's hooks hold the last batch's graph
            wrapper._remove_feature_hooks()
    trained = _unwrap(trained)
    model.load_state_dict({k: v.float() for k, v in trained.state_dict().items()})
    if config.open_gates:  # the EMA weights were last trained and validated with the gates open
        set_gate_opening(model, 1.0)
    metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
    return StageLog(overrides["epochs"], metrics, gamma_stats(model).near_zero)


def calibration_batches(data_yaml: Path, yolo: YoloConfig, seed: int = 0) -> Iterator[tuple[torch.Tensor]]:
    """Training images as the last training epochs saw them (ultralytics' augmentation with
    mosaic closed), shuffled with ``seed``: the batches BN recalibration averages over.

    Un-augmented images are the wrong sample: training's random affine fills borders with
    gray and rescales items, so statistics re-estimated on plain images shift every layer
    and cost a trained detector most of its mAP (docs/yolo.md).
    """
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    overrides = {"data": str(data_yaml), "imgsz": yolo.imgsz, "batch": yolo.batch, "task": "detect", "mode": "train", "mosaic": 0.0}
    dataset = build_yolo_dataset(get_cfg(overrides=overrides), data["train"], yolo.batch, data, mode="train")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the sampler's shuffle and the augmentations' draws
    for batch in build_dataloader(dataset, yolo.batch, yolo.workers, shuffle=True):
        yield (batch["img"].float() / 255,)


def validate_detector(model: nn.Module, data_yaml: Path, yolo: YoloConfig, device: torch.device) -> dict[str, float]:
    """mAP50-95 and mAP50 on the data yaml's val split (a copy is validated: ultralytics fuses it)."""
    args = {
        "data": str(data_yaml), "imgsz": yolo.imgsz, "batch": yolo.batch, "workers": yolo.workers,
        "device": ultralytics_device(device), "plots": False, "verbose": False,
        "mode": "val",
    }
    validator = DetectionValidator(args=args)
    results = validator(model=copy.deepcopy(model).eval())
    return {"map50_95": float(results["metrics/mAP50-95(B)"]), "map50": float(results["metrics/mAP50(B)"])}


def _dataset(data_yaml: Path, split: str, imgsz: int, batch: int):
    """ultralytics' dataset of a split as its validator reads it: letterboxed to ``imgsz``, unaugmented
    (call it within ``ultralytics_output``: it reports its scan of the labels)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    overrides = {"data": str(data_yaml), "imgsz": imgsz, "batch": batch, "task": "detect", "mode": "val"}
    return build_yolo_dataset(get_cfg(overrides=overrides), data[split], batch, data, mode="val")


def split_size(data_yaml: Path, split: str, log_file: Path) -> int:
    with ultralytics_output(log_file):
        return len(_dataset(data_yaml, split, 32, 1))


def letterboxed_images(
    data_yaml: Path, split: str, imgsz: int, count: int, seed: int, batch: int, log_file: Path
) -> Iterator[torch.Tensor]:
    """``count`` images of ``split`` drawn with ``seed``, letterboxed to ``imgsz`` and scaled to [0, 1], in batches."""
    with ultralytics_output(log_file):
        dataset = _dataset(data_yaml, split, imgsz, batch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    for part in order.split(batch):
        yield torch.stack([dataset[int(i)]["img"] for i in part]).float() / 255


class OnnxDetector(nn.Module):
    """An onnxruntime session of an exported detector, shaped as ultralytics' validator takes a model:
    ``names``, ``stride`` and a forward on a float image batch (run in the file's fixed batch size)."""

    def __init__(self, path: Path, names: dict[int, str]) -> None:
        super().__init__()
        self.session = ort_session(path)
        self.batch = fixed_batch(self.session)
        self.names = names
        self.stride = torch.tensor([32.0])

    def __deepcopy__(self, memo: dict) -> "OnnxDetector":
        return self  # the session holds no state between calls and cannot be copied

    def forward(self, images: torch.Tensor, **_: Any) -> torch.Tensor:
        parts = fixed_batch_parts(images.cpu(), self.batch)
        outputs = np.concatenate([self.session.run(None, {"input": part})[0] for part in parts])
        return torch.from_numpy(outputs[: len(images)])


def validate_onnx_detector(path: Path, data_yaml: Path, yolo: YoloConfig) -> dict[str, float]:
    """``validate_detector`` on an ONNX file (FP32 or INT8), run by onnxruntime at the file's input size."""
    from nam_prune.yolo.data import class_names

    names = class_names(data_yaml)
    model = OnnxDetector(path, names)
    classes = model.session.get_outputs()[0].shape[1] - 4  # (batch, 4 box coordinates + classes, anchors)
    if classes != len(names):
        raise NamPruneError(f"the model detects {classes} classes but {data_yaml} names {len(names)}: "
                            "calibrate and score on the data it was trained on")
    size = model.session.get_inputs()[0].shape[-1]
    return validate_detector(model, data_yaml, YoloConfig(data=str(data_yaml), imgsz=size, batch=yolo.batch), torch.device("cpu"))
