"""Does the model a run hands back realise its MAC cut? ``model.pt`` against the plain dense model.

For each run folder: the sparsity-trained ``dense.pt`` with its gates stripped (the model a user
had before compressing) against ``model.pt`` as the recipe produced it (gates kept or stripped,
widths as rounded), in torch (eager, inference mode), frozen channels-last TorchScript (what
``export --format torchscript`` writes) and onnxruntime on the CPU, batch 1 and 32.
Prints ``latency speed-up / MACs speed-up`` (1.0 = the cut is fully realised), measured in one run,
the two models timed in alternation (``benchmarks/timing.py``). Whether a run with a latency target
met it: ``python -m benchmarks latency_target``.

    python -m benchmarks run_speedup runs/fashion_quickstart [more run folders] [--runs 40] [--threads N] [--json NAME.json]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.timing import add_options, benchmark_parser, interleaved_ms, parse, runners, write_result
from nam_prune.artifact import load_with_metadata, record_of
from nam_prune.prune import count_macs_params
from nam_prune.surgery import strip_gates


def measure_run(folder: Path, runs: int) -> dict[str, object]:
    dense, payload = load_with_metadata(folder / "dense.pt")
    strip_gates(dense)
    pruned, _ = load_with_metadata(folder / "model.pt")
    example = record_of(payload).example_input()
    dense_macs, pruned_macs = count_macs_params(dense, example)[0], count_macs_params(pruned, example)[0]
    examples = {f"bs{b}": example.expand(b, *example.shape[1:]).contiguous() for b in (1, 32)}
    with tempfile.TemporaryDirectory() as scratch:
        calls = [runners(model, examples, Path(scratch)) for model in (dense, pruned)]
        passes = {label: max(runs // (5 if label == "bs1" else 8), 1) for label in examples}
        slow, fast = interleaved_ms(calls, passes, rounds=5, warmup=3)
    macs_speedup = dense_macs / pruned_macs
    return {
        "run": str(folder),
        "recipe_prune": payload.get("recipe", {}).get("prune", {}),
        "macs_speedup": macs_speedup,
        "dense_ms": slow,
        "pruned_ms": fast,
        "realised": {key: (slow[key] / fast[key]) / macs_speedup for key in slow},
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("run_speedup", __doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with dense.pt and model.pt)")
    parser.add_argument("--runs", dest="repeats", type=int, default=40, help="timed passes at batch 1")
    add_options(parser)
    args = parse(parser, argv)
    rows = [measure_run(folder, args.repeats) for folder in args.runs]
    for row in rows:
        realised = "  ".join(f"{key} {value:.2f}" for key, value in row["realised"].items())
        print(f"{row['run']}: MACs speed-up {row['macs_speedup']:.2f}x; realised {realised}")
    if args.json:
        write_result(args.json, parser, argv, rows=rows)
