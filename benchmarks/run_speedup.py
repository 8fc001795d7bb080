"""Does the model a run hands back realise its MAC cut? ``model.pt`` against the plain dense model.

For each run folder: the sparsity-trained ``dense.pt`` with its gates stripped (the model a user
had before compressing) against ``model.pt`` as the recipe produced it (gates kept or stripped,
widths as rounded), in torch (eager, inference mode), frozen channels-last TorchScript (what
``export --format torchscript`` writes) and onnxruntime on the CPU, batch 1 and 32.
Prints ``latency speed-up / MACs speed-up`` (1.0 = the cut is fully realised), measured in one run.

    python benchmarks/run_speedup.py runs/fashion_quickstart [more run folders] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nam_prune.artifact import load_with_metadata, record_of
from nam_prune.export import ort_latency_ms, torchscript_latency_ms
from nam_prune.measure import cpu_latency_ms
from nam_prune.prune import count_macs_params
from nam_prune.surgery import strip_gates


def _latencies(model: torch.nn.Module, example: torch.Tensor, runs: int) -> dict[str, float]:
    batch = example.expand(32, *example.shape[1:]).contiguous()
    return {
        "torch_bs1": cpu_latency_ms(model, example, runs, 3),
        "torch_bs32": cpu_latency_ms(model, batch, max(runs // 4, 3), 1),
        "torchscript_bs1": torchscript_latency_ms(model, example, runs, 3),
        "torchscript_bs32": torchscript_latency_ms(model, batch, max(runs // 4, 3), 1),
        "ort_bs1": ort_latency_ms(model, example, runs, 3),
        "ort_bs32": ort_latency_ms(model, batch, max(runs // 4, 3), 1),
    }


def measure_run(folder: Path, runs: int) -> dict[str, object]:
    dense, payload = load_with_metadata(folder / "dense.pt")
    strip_gates(dense)
    pruned, _ = load_with_metadata(folder / "model.pt")
    example = record_of(payload).example_input()
    dense_macs, pruned_macs = count_macs_params(dense, example)[0], count_macs_params(pruned, example)[0]
    slow, fast = _latencies(dense, example, runs), _latencies(pruned, example, runs)
    macs_speedup = dense_macs / pruned_macs
    return {
        "run": str(folder),
        "recipe_prune": payload.get("recipe", {}).get("prune", {}),
        "macs_speedup": macs_speedup,
        "dense_ms": slow,
        "pruned_ms": fast,
        "realised": {key: (slow[key] / fast[key]) / macs_speedup for key in slow},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--runs", dest="repeats", type=int, default=40, help="timed passes at batch 1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [measure_run(folder, args.repeats) for folder in args.runs]
    for row in rows:
        realised = "  ".join(f"{key} {value:.2f}" for key, value in row["realised"].items())
        print(f"{row['run']}: MACs speed-up {row['macs_speedup']:.2f}x; realised {realised}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
