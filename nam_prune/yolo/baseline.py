"""The trained detector a pruning run starts from, made with ultralytics' own trainer.

Users prune a trained ``best.pt``, not a random detector, and published YOLO pruning results
start from one too. ``nam-prune train-detector yolov8n.yaml --data fashion-detect --out DIR``
trains a plain model (no gates, no penalty) until its mAP50-95 stops rising: the mean over the
last ``plateau`` epochs is less than ``min_gain`` points above the mean of the ``plateau`` before
them. Means, not bests: on a small validation set mAP swings by 25 points between neighbouring
epochs, and a rule on the best stops at the first lucky peak. The learning rate follows a cosine
over ``epochs``, the cap; once the rule fires, the last ``anneal`` epochs bring it down to its
floor with mosaic off (what ultralytics does in a run's final epochs), so the detector is
trained out, not stopped halfway down its schedule. ``DIR/weights/best.pt`` is what a recipe's
``model.name`` then names; ``DIR/training.json`` keeps the per-epoch mAP and why it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from nam_prune.checkpoint import atomic_write
from nam_prune.config import bounded
from nam_prune.errors import NamPruneError
from nam_prune.yolo.data import data_yaml_of
from nam_prune.yolo.models import build_yolo, ultralytics_module
from nam_prune.yolo.train import ultralytics_device, ultralytics_output

ultralytics_module()  # a one-line error, not an ImportError, when ultralytics is missing
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402

MAP_KEY = "metrics/mAP50-95(B)"


@dataclass
class DetectorTraining:
    """How ``train-detector`` trains: ultralytics' arguments plus the plateau rule that stops it."""

    model: str
    data: str = "fashion-detect"
    epochs: int = bounded(100, low=1)
    plateau: int = bounded(10, low=1)
    min_gain: float = bounded(0.5, low=0.0)
    min_epochs: int = bounded(30, low=1)
    anneal: int = bounded(10, low=0)
    imgsz: int = bounded(160, low=32)
    batch: int = bounded(32, low=1)
    lr: float = 0.001
    weight_decay: float = 5.0e-4
    workers: int = bounded(0, low=0)
    seed: int = 0

    def command(self, out: Path) -> str:
        """The command line that runs this training into ``out``."""
        flags = {k: v for k, v in asdict(self).items() if k != "model" and v != getattr(DetectorTraining, k)}
        options = [f"--{k.replace('_', '-')} {v}" for k, v in flags.items()]
        return " ".join(["nam-prune train-detector", self.model, f"--out {out}", *options])


@dataclass
class TrainingResult:
    best_pt: str
    epochs_run: int
    plateaued: bool
    gain_last_epochs: float
    anneal_from: int | None
    best_map50_95: float
    best_epoch: int
    seconds: float
    map50_95: list[float] = field(default_factory=list)


def plateau_gain(history: list[float], window: int) -> float | None:
    """Points the mean mAP of the last ``window`` epochs adds to the mean of the ``window`` before them
    (None while too short)."""
    if len(history) < 2 * window:
        return None
    return (sum(history[-window:]) - sum(history[-2 * window : -window])) / window


def annealed(schedule: Callable[[int], float], start: int, epochs: int, floor: float) -> Callable[[int], float]:
    """``schedule`` (a learning-rate factor per epoch) up to ``start``, then a half cosine from its value
    there down to ``floor`` over ``epochs`` more."""
    top = schedule(start)

    def factor(epoch: int) -> float:
        if epoch <= start:
            return schedule(epoch)
        done = min(epoch - start, epochs) / epochs
        return floor + (top - floor) * (1 + math.cos(math.pi * done)) / 2

    return factor


def train_plain_detector(config: DetectorTraining, out: Path, device: torch.device) -> TrainingResult:
    """Train ``config.model`` (an ultralytics yaml) plainly into ``out`` until mAP50-95 plateaus."""
    if not config.model.endswith((".yaml", ".yml")):
        raise NamPruneError(f"train-detector builds a model from its ultralytics yaml (yolov8n.yaml), not {config.model!r}")
    build_yolo(config.model, num_classes=1, in_channels=3)  # an unknown yaml is a one-line error before out is made
    if (out / "weights" / "best.pt").exists():
        raise NamPruneError(f"{out} already holds a trained detector; choose another --out or delete it")
    data_yaml = data_yaml_of(config.data, out, config.imgsz)  # a missing user yaml stops here, before out is made
    overrides = {
        "model": config.model, "data": str(data_yaml), "epochs": config.epochs, "imgsz": config.imgsz,
        "batch": config.batch, "workers": config.workers, "device": ultralytics_device(device),
        "optimizer": "AdamW", "lr0": config.lr, "lrf": 0.01, "cos_lr": True, "weight_decay": config.weight_decay,
        "seed": config.seed, "deterministic": True, "project": str(out.parent.resolve()), "name": out.name,
        "exist_ok": True, "plots": False, "verbose": False, "patience": config.epochs,
    }
    history: list[float] = []
    shown = Console(file=sys.stderr)  # ultralytics' own output goes to the log; these lines stay on screen

    trained_epochs: set[int] = set()  # a set: an epoch ultralytics redoes after a NaN is one epoch
    fired: list[tuple[int, float]] = []  # (epoch, gain) once the rule fires

    def on_epoch_end(trainer: DetectionTrainer) -> None:
        if len(history) == len(trained_epochs):
            return  # ultralytics' final validation of best.pt calls this once more, with no epoch trained
        history.append(100 * float(trainer.metrics.get(MAP_KEY, 0.0)))
        gain = plateau_gain(history, config.plateau)
        shown.print(f"epoch {len(history)}/{trainer.epochs}: mAP50-95 {history[-1]:.1f}% (best {max(history):.1f}%)")
        if fired or len(history) < config.min_epochs or gain is None or gain >= config.min_gain:
            return
        fired.append((len(history), gain))
        anneal = min(config.anneal, config.epochs - len(history))
        if anneal == 0:
            trainer.stop = True
            return
        shown.print(f"mAP50-95 stopped rising (+{gain:.2f} points): {anneal} annealing epochs, mosaic off")
        # ultralytics reads trainer.epochs each epoch (final epoch, closing mosaic), as its own time limit does
        trainer.epochs = trainer.args.epochs = len(history) + anneal
        trainer.args.close_mosaic = max(trainer.args.close_mosaic, anneal)  # mosaic off from the first annealing epoch
        trainer.lf = annealed(trainer.lf, trainer.scheduler.last_epoch, anneal, trainer.args.lrf)
        trainer.scheduler.lr_lambdas = [trainer.lf] * len(trainer.scheduler.lr_lambdas)

    tick = time.perf_counter()
    with ultralytics_output(out / "ultralytics.log"):
        trainer = DetectionTrainer(overrides=overrides)
        trainer.add_callback("on_train_epoch_end", lambda trainer: trained_epochs.add(trainer.epoch))
        trainer.add_callback("on_fit_epoch_end", on_epoch_end)
        trainer.train()
    stop_epoch, gain = fired[0] if fired else (None, plateau_gain(history, config.plateau))
    result = TrainingResult(
        best_pt=str(out / "weights" / Path(trainer.best).name), epochs_run=len(history), plateaued=bool(fired),
        gain_last_epochs=round(gain, 2) if gain is not None else float("nan"),
        anneal_from=stop_epoch if stop_epoch is not None and len(history) > stop_epoch else None,
        best_map50_95=round(max(history), 2),
        best_epoch=history.index(max(history)) + 1, seconds=round(time.perf_counter() - tick, 1), map50_95=[round(m, 2) for m in history],
    )
    summary = {"command": config.command(out), "config": asdict(config), **asdict(result)}
    atomic_write(out / "training.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return result
