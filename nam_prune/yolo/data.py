"""Stage 0 for detectors: the data yaml ultralytics trains on.

``data: demo`` builds a two-image detection set from the photos that ship inside the
ultralytics package (``bus.jpg``, ``zidane.jpg``), with boxes written down once below.
It exercises every step offline; it is far too small to say anything about mAP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from nam_prune.data import FASHION_CLASSES
from nam_prune.errors import NamPruneError
from nam_prune.fashion_detect import FashionDetectConfig, make_fashion_detect

DEMO_NAMES = {0: "person", 1: "bus", 2: "tie"}
DEMO_BOXES: dict[str, list[tuple[int, int, int, int, int]]] = {
    # class, x0, y0, x1, y1 in pixels, read off the images once (bus.jpg is 810x1080, zidane.jpg 1280x720)
    "bus.jpg": [
        (1, 17, 230, 801, 740),
        (0, 48, 398, 245, 902),
        (0, 221, 405, 344, 857),
        (0, 670, 380, 810, 875),
        (0, 0, 550, 63, 873),
    ],
    "zidane.jpg": [
        (0, 743, 48, 1141, 720),
        (0, 123, 197, 712, 720),
        (2, 437, 437, 524, 709),
    ],
}


def ultralytics_assets() -> Path:
    try:
        from ultralytics.utils import ASSETS
    except ImportError as error:
        raise NamPruneError("YOLO data needs ultralytics: pip install 'nam-prune[yolo]'") from error
    return Path(ASSETS)


def build_demo_set(folder: Path) -> Path:
    """Write the demo images, YOLO-format labels and ``data.yaml`` under ``folder``; returns the yaml.

    Train and val are the same two images: the set checks plumbing, not generalisation.
    """
    from PIL import Image

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for name, boxes in DEMO_BOXES.items():
        source = ultralytics_assets() / name
        if not source.is_file():
            raise NamPruneError(f"the ultralytics package has no {source}; reinstall ultralytics")
        shutil.copyfile(source, images / name)
        width, height = Image.open(source).size
        rows = [
            f"{cls} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"
            for cls, x0, y0, x1, y1 in boxes
        ]
        (labels / f"{Path(name).stem}.txt").write_text("\n".join(rows) + "\n")
    data_yaml = folder / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(folder.resolve()), "train": "images", "val": "images", "names": DEMO_NAMES}))
    return data_yaml


BUILT_IN_NAMES = {"demo": DEMO_NAMES, "fashion-detect": dict(enumerate(FASHION_CLASSES))}
"""The built-in sets ``yolo.data`` can name, with their class names."""


def built_in_data_yaml(name: str, folder: Path, imgsz: int) -> Path:
    """Write the built-in set ``name`` (``demo`` or ``fashion-detect`` at ``imgsz``) under ``folder``; its yaml.
    fashion-detect's images are the same whatever the recipe's seed: every arm sees the same data."""
    if name == "demo":
        return build_demo_set(folder / "demo_data")
    return make_fashion_detect(folder / "fashion_detect_data", FashionDetectConfig(imgsz=imgsz))


def data_yaml_of(data: str, folder: Path, imgsz: int) -> Path:
    """``yolo.data`` as a data yaml: a built-in set written under ``folder``, or the user's, checked to exist."""
    return built_in_data_yaml(data, folder, imgsz) if data in BUILT_IN_NAMES else user_data_yaml(data)


def user_data_yaml(data: str) -> Path:
    """The user's ultralytics data yaml (``yolo.data``), checked to exist."""
    path = Path(data)
    if not path.is_file():
        raise NamPruneError(
            f"yolo.data {data!r} not found: give an ultralytics data yaml (path, train, val, names), 'fashion-detect' or 'demo'"
        )
    return path


def class_names(data_yaml: Path) -> dict[int, str]:
    """The ``names`` of a data yaml as {index: name} (ultralytics accepts a list or a mapping)."""
    try:
        names = yaml.safe_load(data_yaml.read_text()).get("names")
    except (yaml.YAMLError, AttributeError) as error:
        raise NamPruneError(f"{data_yaml} is not an ultralytics data yaml (a mapping with 'names')") from error
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise NamPruneError(f"{data_yaml} has no 'names': list the class names of the data set")
    return {int(k): str(v) for k, v in names.items()}
