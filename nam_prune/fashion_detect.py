"""A detection set made offline from real images: Fashion-MNIST items on larger canvases.

``nam-prune data fashion-detect --out DIR`` writes it in ultralytics' layout (``images/``,
``labels/``, ``data.yaml``) so a YOLO recipe can train and validate on it with no download.
Each canvas holds several items at varied scale and position, some overlapping; every box is
the exact extent of its item's non-zero pixels and its class is the item's label. Train images
come from Fashion-MNIST's training split, val images from its test split, all drawn from one
seeded generator. It is a derived set for offline evidence: real users point ``yolo.data`` at
their own data yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from nam_prune.checkpoint import atomic_write
from nam_prune.config import bounded
from nam_prune.data import DEFAULT_ROOTS, FASHION_CLASSES, fashion_mnist_arrays
from nam_prune.errors import NamPruneError


@dataclass
class FashionDetectConfig:
    """images: canvases in all (a fifth go to val); imgsz: canvas side; objects: items per canvas
    (min, max); scale: item side as a multiple of 28 px (min, max)."""

    images: int = bounded(2000, low=10)
    imgsz: int = bounded(160, low=64)
    seed: int = 0
    min_objects: int = bounded(2, low=1)
    max_objects: int = bounded(5, low=1)
    min_scale: float = bounded(1.0, low=0.5)
    max_scale: float = bounded(2.5, low=0.5)


def _canvas(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, config: FashionDetectConfig
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """One canvas and its boxes (class, x0, y0, x1, y1 in pixels, x1/y1 exclusive)."""
    size = config.imgsz
    canvas = np.zeros((size, size), dtype=np.uint8)
    boxes = []
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        index = int(rng.integers(len(images)))
        side = max(8, min(size, int(round(28 * rng.uniform(config.min_scale, config.max_scale)))))
        item = np.asarray(Image.fromarray(images[index]).resize((side, side), Image.BILINEAR))
        rows, cols = np.nonzero(item)
        if rows.size == 0:
            continue
        x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        region = canvas[y0:y0 + side, x0:x0 + side]
        np.maximum(region, item, out=region)  # overlapping items blend; each keeps its own extent
        boxes.append((int(labels[index]), x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1))
    return canvas, boxes


def make_fashion_detect(out: Path, config: FashionDetectConfig | None = None, root: Path | None = None) -> Path:
    """Write the set under ``out`` and return its ``data.yaml``; the same seed gives the same files."""
    config = config or FashionDetectConfig()
    if config.max_objects < config.min_objects or config.max_scale < config.min_scale:
        raise NamPruneError("fashion-detect: the maximum objects/scale must not be below the minimum")
    if 28 * config.min_scale > config.imgsz:
        raise NamPruneError(f"fashion-detect: items of {28 * config.min_scale:.0f} px do not fit a {config.imgsz} px canvas")
    root = Path(root or DEFAULT_ROOTS["fashion_mnist"])
    rng = np.random.default_rng(config.seed)
    val_count = max(1, config.images // 5)
    for split, source, count in (("train", "train", config.images - val_count), ("val", "t10k", val_count)):
        images, labels = fashion_mnist_arrays(root, source)
        image_dir, label_dir = out / "images" / split, out / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for number in range(count):
            canvas, boxes = _canvas(rng, images, labels, config)
            stem = f"{split}_{number:05d}"
            Image.fromarray(canvas).convert("RGB").save(image_dir / f"{stem}.png")
            size = config.imgsz
            rows = [
                f"{cls} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} {(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}"
                for cls, x0, y0, x1, y1 in boxes
            ]
            (label_dir / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    data_yaml = out / "data.yaml"
    tree = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": dict(enumerate(FASHION_CLASSES))}
    atomic_write(data_yaml, lambda tmp: Path(tmp).write_text(yaml.safe_dump(tree, sort_keys=False)))
    return data_yaml
