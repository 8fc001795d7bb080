"""Did a run with a latency target hand back a model at its target? Re-timed in a process of its own.

For each run folder with ``prune.target: latency``: ``model.pt`` against the sparsity-trained
``dense.pt`` with its gates stripped (the model a user had before compressing), both in the form
they ship in, on the run's runtime and batch, with the pipeline's own paired timing
(``nam_prune.prune.latency``: alternating rounds, the median of the paired ratios). The ratio is
measured ``--repeats`` times; the line shows each reading, their median and how far that is off
the target (the issue's bound: ±10%).

    python -m benchmarks latency_target runs/fashion_quickstart [more run folders] [--repeats 3] [--json NAME.json]
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune.artifact import load_with_metadata, record_of
from nam_prune.prune.latency import LatencyMeter
from nam_prune.surgery import strip_gates
from nam_prune.tasks import task_class


def measure_run(folder: Path, repeats: int) -> dict[str, object]:
    searched = json.loads((folder / "results.json").read_text()).get("latency_target")
    if not searched:
        raise SystemExit(f"{folder}: the run has no latency target (prune.target: latency)")
    dense, payload = load_with_metadata(folder / "dense.pt")
    strip_gates(dense)
    pruned, _ = load_with_metadata(folder / "model.pt")
    record = record_of(payload)
    meter = LatencyMeter(dense, record.example_input(), searched["runtime"], searched["batch"], strip=False,
                         deploy_mode=task_class(record.spec.name).deploy_mode)
    try:
        readings = [meter.ratio(pruned) for _ in range(repeats)]
    finally:
        meter.close()
    ratio = statistics.median(r[0] for r in readings)
    return {
        "run": str(folder),
        "runtime": searched["runtime"],
        "batch": searched["batch"],
        "target": searched["target"],
        "ratio_in_run": searched["ratio"],
        "ratios_here": [r[0] for r in readings],
        "dense_ms_here": [r[1] for r in readings],
        "pruned_ms_here": [r[2] for r in readings],
        "ratio_here": ratio,
        "off_target": ratio / searched["target"] - 1,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("latency_target", __doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of runs with prune.target: latency")
    parser.add_argument("--repeats", type=int, default=3, help="paired ratios measured per run")
    add_options(parser)
    args = parse(parser, argv)
    rows = [measure_run(folder, args.repeats) for folder in args.runs]
    for row in rows:
        readings = ", ".join(f"{r:.3f}" for r in row["ratios_here"])
        print(f"{row['run']}: target {row['target']:.3f} of dense on {row['runtime']} at batch {row['batch']}; "
              f"the run timed {row['ratio_in_run']:.3f}; here {readings} -> {row['ratio_here']:.3f} "
              f"({row['off_target']:+.1%} off the target)")
    if args.json:
        write_result(args.json, parser, argv, rows=rows)
