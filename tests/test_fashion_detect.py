"""The offline detection set: deterministic for a seed, and every box is its item's exact extent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from conftest import cli
from PIL import Image

from nam_prune.fashion_detect import FashionDetectConfig, make_fashion_detect


def _boxes(label: Path, size: int) -> list[tuple[int, int, int, int, int]]:
    boxes = []
    for line in label.read_text().split("\n"):
        if line:
            cls, xc, yc, w, h = (float(v) for v in line.split())
            x0, y0 = round((xc - w / 2) * size), round((yc - h / 2) * size)
            boxes.append((int(cls), x0, y0, x0 + round(w * size), y0 + round(h * size)))
    return boxes


def test_boxes_cover_exactly_their_items(tmp_path, fashion_root):
    config = FashionDetectConfig(images=20, imgsz=96, seed=3)
    data_yaml = make_fashion_detect(tmp_path / "set", config)
    tree = yaml.safe_load(data_yaml.read_text())
    assert tree["train"] == "images/train" and tree["val"] == "images/val" and len(tree["names"]) == 10
    assert len(list((tmp_path / "set/images/train").iterdir())) == 16
    assert len(list((tmp_path / "set/images/val").iterdir())) == 4
    counts = []
    for image_path in sorted((tmp_path / "set/images/train").iterdir()):
        pixels = np.asarray(Image.open(image_path).convert("L"))
        assert pixels.shape == (96, 96)
        boxes = _boxes(tmp_path / "set/labels/train" / f"{image_path.stem}.txt", 96)
        counts.append(len(boxes))
        covered = np.zeros_like(pixels, dtype=bool)
        for cls, x0, y0, x1, y1 in boxes:
            assert 0 <= cls < 10 and 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            box = pixels[y0:y1, x0:x1]
            # tight: each edge row and column of the box holds some of the item's pixels
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            covered[y0:y1, x0:x1] = True
        assert not pixels[~covered].any()  # no item pixel outside every box
    assert min(counts) >= 1 and max(counts) > 2  # several objects per image


def test_same_seed_same_files_other_seed_other_files(tmp_path, fashion_root):
    config = FashionDetectConfig(images=10, imgsz=64, seed=1)
    first = make_fashion_detect(tmp_path / "a", config).parent
    second = make_fashion_detect(tmp_path / "b", config).parent
    other = make_fashion_detect(tmp_path / "c", FashionDetectConfig(images=10, imgsz=64, seed=2)).parent
    name = "images/train/train_00000.png"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "labels/val/val_00000.txt").read_text() == (second / "labels/val/val_00000.txt").read_text()
    assert (first / name).read_bytes() != (other / name).read_bytes()


def test_cli_writes_the_set(tmp_path, fashion_root):
    done = cli("data", "fashion-detect", "--out", str(tmp_path / "d"), "--images", "10")
    assert done.returncode == 0, done.stderr[-1000:]
    assert (tmp_path / "d/data.yaml").is_file()
