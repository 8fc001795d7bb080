"""Should a torch user run ``torch.jit.optimize_for_inference`` on the file ``export --format torchscript``
writes? The file as loaded against the file passed through it, on the CPU.

``optimize_for_inference`` re-packs a frozen graph's convolutions into oneDNN's own layout, once, at
load time. Its result cannot be saved (its packed weights do not serialise), so the export cannot
write it: it is one line after ``torch.jit.load``. This measures what that line is worth for the
models the speed-up targets use (ResNet-50 and MobileNetV2 at 50% of their MACs, round_to 16, as in
``speedup.py``; their dense originals for reference) and for a YOLO detector (yolov8n, dense, in its
export form). Timed in alternation (``timing.py``); the JSON keeps every round's paired speed-up.

    python benchmarks/load_optimize.py [--json docs/load_optimize.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch
from speedup import pruned_variant
from timing import cpu_model, interleaved_rounds, median_quartiles, pooled_median_ms, round_speedups, write_result

from nam_prune.export import DeployMode, export_torchscript
from nam_prune.models import ModelSpec, build_model
from nam_prune.yolo.task import detect_export_mode


def loaded_forms(
    model: torch.nn.Module, examples: dict[str, torch.Tensor], folder: Path, deploy_mode: DeployMode
) -> tuple[dict[str, object], dict[str, object]]:
    """``({file_label: call}, {ofi_label: call})``: the exported file as ``torch.jit.load`` gives it,
    and the same file passed through ``torch.jit.optimize_for_inference``."""
    as_loaded, optimized = {}, {}
    for label, x in examples.items():
        path = folder / f"{id(model)}-{label}.pt"
        export_torchscript(model, x, path, deploy_mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain, packed = torch.jit.load(str(path)), torch.jit.optimize_for_inference(torch.jit.load(str(path)))
        with torch.inference_mode():
            diff = (plain(x) - packed(x)).abs().max().item()
        print(f"  {label}: optimize_for_inference changes outputs by at most {diff:.1e}")
        as_loaded[f"ts_{label}"] = lambda x=x, f=plain: f(x)
        optimized[f"ts_{label}"] = lambda x=x, f=packed: f(x)
    return as_loaded, optimized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs1", type=int, default=10, help="batch-1 calls per form and round")
    parser.add_argument("--runs32", type=int, default=1, help="batch-32 calls per form and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: each speed-up comes with quartiles over rounds")
    classifier_inputs = {"bs1": torch.randn(1, 3, 224, 224), "bs32": torch.randn(32, 3, 224, 224)}
    cases = [
        ("resnet50 dense", build_model(ModelSpec("resnet50", num_classes=1000)).eval(), classifier_inputs, contextlib.nullcontext),
        ("resnet50 50% MACs", pruned_variant("resnet50", 16, True, 0.5), classifier_inputs, contextlib.nullcontext),
        ("mobilenet_v2 dense", build_model(ModelSpec("mobilenet_v2", num_classes=1000)).eval(), classifier_inputs,
         contextlib.nullcontext),
        ("mobilenet_v2 50% MACs", pruned_variant("mobilenet_v2", 16, True, 0.5), classifier_inputs, contextlib.nullcontext),
        ("yolov8n dense", build_model(ModelSpec("yolov8n.yaml", num_classes=80)).eval(),
         {"bs1": torch.rand(1, 3, 640, 640), "bs32": torch.rand(32, 3, 320, 320)}, detect_export_mode),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model, examples, deploy_mode in cases:
            print(name)
            forms = loaded_forms(model, examples, Path(folder), deploy_mode)
            plain, packed = interleaved_rounds(list(forms), {"bs1": args.runs1, "bs32": args.runs32}, args.rounds, args.warmup)
            row = {"model": name, "inputs": {k: list(x.shape) for k, x in examples.items()},
                   "ms_as_loaded": pooled_median_ms(plain), "ms_optimized": pooled_median_ms(packed), "speedup": {}}
            for column in plain:
                speedup = row["speedup"][column] = median_quartiles(round_speedups(plain[column], packed[column]))
                low, high = speedup["quartiles"]
                print(f"  {column}: {row['ms_as_loaded'][column]:8.1f} ms as loaded, {row['ms_optimized'][column]:8.1f} ms "
                      f"optimized: x{speedup['median']:.2f} ({low:.2f}-{high:.2f})")
            rows.append(row)
    print("(x: speed-up of optimize_for_inference over the file as loaded, median and quartiles of paired rounds)")
    if args.json:
        write_result(args.json, "load_optimize.py", args, rows=rows)


if __name__ == "__main__":
    main()
