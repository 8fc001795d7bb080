"""Does the model a run hands back realise its MAC cut? ``model.pt`` against the plain dense model.

For each run folder: the sparsity-trained ``dense.pt`` with its gates stripped (the model a user
had before compressing) against ``model.pt`` as the recipe produced it (gates kept or stripped,
widths as rounded), in torch (eager, inference mode), frozen channels-last TorchScript (what
``export --format torchscript`` writes) and onnxruntime on the CPU, batch 1 and 32.
Prints ``latency speed-up / MACs speed-up`` (1.0 = the cut is fully realised), measured in one run,
the two models timed in alternation (``benchmarks/timing.py``). Whether a run with a latency target
met it: ``python -m benchmarks latency_target``.

A detector's models run in their export form (``Detect`` without box decoding changes, as
``export`` writes them); ``--image-size 640 --batches 1`` times a YOLO run at the size it is deployed at.

    python -m benchmarks run_speedup runs/fashion_quickstart [more run folders] [--runs 40] [--batches 1,32]
                                     [--image-size N] [--threads N] [--json NAME.json]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.timing import add_options, benchmark_parser, interleaved_ms, parse, runners, write_result
from nam_prune.artifact import load_with_metadata, record_of
from nam_prune.prune import count_macs_params
from nam_prune.surgery import strip_gates
from nam_prune.tasks import task_class


def measure_run(folder: Path, runs: int, batches: Sequence[int] = (1, 32), image_size: int | None = None) -> dict[str, object]:
    dense, payload = load_with_metadata(folder / "dense.pt")
    strip_gates(dense)
    pruned, _ = load_with_metadata(folder / "model.pt")
    record = record_of(payload)
    example = record.example_input()
    if image_size:
        example = torch.rand(1, example.shape[1], image_size, image_size, generator=torch.Generator().manual_seed(0))
    dense_macs, pruned_macs = count_macs_params(dense, example)[0], count_macs_params(pruned, example)[0]
    examples = {f"bs{b}": example.expand(b, *example.shape[1:]).contiguous() for b in batches}
    deploy_mode = task_class(record.spec.name).deploy_mode
    with tempfile.TemporaryDirectory() as scratch:
        calls = [runners(model, examples, Path(scratch), deploy_mode) for model in (dense, pruned)]
        passes = {label: max(runs // (5 if label == "bs1" else 8), 1) for label in examples}
        slow, fast = interleaved_ms(calls, passes, rounds=5, warmup=3)
    macs_speedup = dense_macs / pruned_macs
    return {
        "run": str(folder),
        "recipe_prune": payload.get("recipe", {}).get("prune", {}),
        "input": list(example.shape[1:]),
        "macs_speedup": macs_speedup,
        "macs_cut": 1 - pruned_macs / dense_macs,
        "dense_ms": slow,
        "pruned_ms": fast,
        "realised": {key: (slow[key] / fast[key]) / macs_speedup for key in slow},
        "latency_cut_share": {key: (1 - fast[key] / slow[key]) / (1 - pruned_macs / dense_macs) for key in slow},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("run_speedup", __doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with dense.pt and model.pt)")
    parser.add_argument("--runs", dest="repeats", type=int, default=40, help="timed passes at batch 1")
    parser.add_argument("--batches", default="1,32", help="batch sizes to time, comma-separated")
    parser.add_argument("--image-size", type=int, help="input height and width (default: the run's recipe's)")
    add_options(parser)
    args = parse(parser, argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = [measure_run(folder, args.repeats, batches, args.image_size) for folder in args.runs]
    for row in rows:
        realised = "  ".join(f"{key} {value:.2f}" for key, value in row["realised"].items())
        shares = "  ".join(f"{key} {value:.2f}" for key, value in row["latency_cut_share"].items())
        print(f"{row['run']}: MACs speed-up {row['macs_speedup']:.2f}x; realised {realised}; "
              f"share of the MACs cut realised as latency cut: {shares}")
    if args.json:
        write_result(args.json, parser, argv, rows=rows)
