"""The YOLO family's own commands, added to ``nam-prune`` through the family's ``commands`` hook.

Importing this module imports click only: ultralytics loads when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from nam_prune.console import console


@click.command("train-detector")
@click.argument("model")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder (weights/best.pt, training.json).")
@click.option("--data", default="fashion-detect", show_default=True, help="An ultralytics data yaml, 'fashion-detect' or 'demo'.")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True, help="Cap; the cosine learning rate spans it.")
@click.option("--plateau", type=click.IntRange(min=1), default=10, show_default=True,
              help="Anneal, then stop, once the mean mAP50-95 of these last epochs ...")
@click.option("--min-gain", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="... is less than this many points above the mean of as many before them.")
@click.option("--min-epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Never stop before this epoch.")
@click.option("--anneal", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs after the stop that bring the learning rate to its floor, mosaic off.")
@click.option("--imgsz", type=click.IntRange(min=32), default=160, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def train_detector(model: str, out: Path, data: str, epochs: int, plateau: int, min_gain: float, min_epochs: int,
                   anneal: int, imgsz: int, batch: int, seed: int, device: str) -> None:
    """Train a plain YOLO MODEL (an ultralytics yaml) until its mAP50-95 stops rising: the trained
    detector a recipe's model.name then prunes (ultralytics' own trainer, no gates, no penalty)."""
    from nam_prune.pipeline import resolve_device
    from nam_prune.yolo.baseline import DetectorTraining, train_plain_detector

    config = DetectorTraining(
        model, data=data, epochs=epochs, plateau=plateau, min_gain=min_gain, min_epochs=min_epochs, anneal=anneal, imgsz=imgsz,
        batch=batch, seed=seed,
    )
    result = train_plain_detector(config, out, resolve_device(device))
    if not result.plateaued:
        state = f"still rising at the cap (+{result.gain_last_epochs} points): raise --epochs"
    elif result.anneal_from is None:
        state = "stopped rising"
    else:
        state = f"stopped rising at epoch {result.anneal_from}, then annealed"
    console.print(
        f"{result.epochs_run} epochs in {result.seconds / 60:.0f} min: best mAP50-95 {result.best_map50_95}% at epoch "
        f"{result.best_epoch}, {state}; prune it with model.name={result.best_pt} model.trust_pickle=true"
    )
