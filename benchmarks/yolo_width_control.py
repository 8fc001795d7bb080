"""Is pruning worth it against a smaller model trained from scratch? A narrowed yolov8n as the control.

Builds yolov8n with a smaller width multiple (``--width``, 0.25 is yolov8n itself), prints its
GFLOPs at 160 px, trains it from scratch with ultralytics on the derived Fashion-MNIST detection
set (the same canvases as ``yolo.data: fashion-detect``) with the detector recipes' optimizer and
schedule, and prints its mAP. Compare with a pruned model of about the same GFLOPs trained as many
epochs in all (``docs/yolo_fashion_detect_*``). ``--images``, ``--image-size`` and ``--batch`` make
the set and the training smaller (the defaults are the recipes'); GFLOPs are always counted at 160 px.

    python -m benchmarks yolo_width_control --width 0.16 --epochs 50 --out runs/width_control [--json NAME.json]
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

os.environ.setdefault("YOLO_OFFLINE", "1")

import ultralytics
from ultralytics import YOLO

from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune.fashion_detect import FashionDetectConfig, make_fashion_detect
from nam_prune.measure import gflops
from nam_prune.prune import count_macs_params


def narrowed_yaml(width: float, classes: int, folder: Path) -> Path:
    """ultralytics' yolov8 yaml with one scale, ``n`` at depth 0.33 and width ``width``."""
    config = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    config = {**copy.deepcopy(config), "nc": classes, "scales": {"n": [0.33, width, 1024]}}
    path = folder / f"yolov8_width{width}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("yolo_width_control", __doc__)
    parser.add_argument("--width", type=float, default=0.16, help="width multiple (yolov8n: 0.25)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/width_control"), help="folder for the data set and the training")
    parser.add_argument("--images", type=int, default=FashionDetectConfig.images, help="canvases in the derived set (a fifth for val)")
    parser.add_argument("--image-size", type=int, default=160, help="canvas side and training image size in pixels")
    parser.add_argument("--batch", type=int, default=32)
    add_options(parser, threads=False)
    args = parse(parser, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    size = args.image_size
    data = make_fashion_detect(args.out / "fashion_detect_data", FashionDetectConfig(images=args.images, imgsz=size))
    model = YOLO(str(narrowed_yaml(args.width, 10, args.out)))
    macs, params = count_macs_params(model.model.eval(), torch.zeros(1, 3, 160, 160))
    print(f"width {args.width}: {params / 1e6:.3f}M params, {gflops(macs):.4f} GFLOPs at 160 px")
    model.train(data=str(data), epochs=args.epochs, imgsz=size, batch=args.batch, workers=0, device="cpu", optimizer="AdamW",
                lr0=1e-3, lrf=0.01, cos_lr=True, momentum=0.9, weight_decay=5e-4, warmup_epochs=3, seed=0,
                deterministic=True, project=str(args.out.resolve()), name="train", exist_ok=True, plots=False,
                verbose=False, amp=False)
    metrics = model.val(data=str(data), imgsz=size, batch=args.batch, device="cpu", plots=False)
    result = {"width_multiple": args.width, "params": params, "gflops_at_160": gflops(macs), "epochs": args.epochs,
              "images": args.images, "image_size": size, "map50": metrics.box.map50, "map50_95": metrics.box.map}
    print(f"width {args.width}, {args.epochs} epochs from scratch: mAP50 {result['map50']:.4f}, "
          f"mAP50-95 {result['map50_95']:.4f}")
    if args.json:
        write_result(args.json, parser, argv, **result)
