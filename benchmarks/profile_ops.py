"""Where does a pruned model's batch-32 time go? Dense against pruned ResNet-50, op by op.

Profiles (torch.profiler, CPU) a few calls of each model in the form ``export --format torchscript``
writes (frozen, channels-last, in slices), the pruned one as ``speedup.py`` makes it (50% of the
MACs, round_to 16), and sums each op's own time by op and by the height of its input map: which
stages realise their cut and which do not. One model after the other, not alternated: the ratios
here explain, ``speedup.py`` measures.

    python benchmarks/profile_ops.py [--json docs/profile_ops_resnet50_bs32.json]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
from speedup import pruned_variant
from timing import cpu_model, write_result
from torch.profiler import ProfilerActivity, profile

from nam_prune.export import frozen_torchscript
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import count_macs_params


def op_ms(model: torch.nn.Module, x: torch.Tensor, calls: int) -> dict[str, float]:
    """Milliseconds per call of each op's own time, keyed ``op@height`` (``op`` for inputs of another rank)."""
    frozen = frozen_torchscript(model, x)
    with torch.inference_mode():
        for _ in range(2):  # the first calls of a frozen module optimize its graph
            frozen(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                frozen(x)
    totals: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::"):
            shapes = event.input_shapes
            where = f"@{shapes[0][2]}px" if shapes and len(shapes[0]) == 4 else ""
            totals[event.key + where] += event.self_cpu_time_total / 1000 / calls
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dense = build_model(ModelSpec("resnet50", num_classes=1000)).eval()
    pruned = pruned_variant("resnet50", 16, True, 0.5)
    x = torch.randn(32, 3, 224, 224)
    macs_speedup = count_macs_params(dense, x[:1])[0] / count_macs_params(pruned, x[:1])[0]
    dense_ms, pruned_ms = op_ms(dense, x, args.calls), op_ms(pruned, x, args.calls)
    rows = sorted(
        ({"op": key, "dense_ms": dense_ms.get(key, 0.0), "pruned_ms": pruned_ms.get(key, 0.0)}
         for key in set(dense_ms) | set(pruned_ms)),
        key=lambda row: -row["dense_ms"],
    )
    print(f"{cpu_model()}; MACs speed-up {macs_speedup:.2f}")
    for row in rows:
        if max(row["dense_ms"], row["pruned_ms"]) >= 2:
            speedup = row["dense_ms"] / row["pruned_ms"] if row["pruned_ms"] else float("inf")
            print(f"{row['op']:40s} {row['dense_ms']:8.1f} ms {row['pruned_ms']:8.1f} ms  x{speedup:.2f}")
    total_dense, total_pruned = sum(dense_ms.values()), sum(pruned_ms.values())
    print(f"{'all ops':40s} {total_dense:8.1f} ms {total_pruned:8.1f} ms  x{total_dense / total_pruned:.2f}")
    if args.json:
        write_result(args.json, "profile_ops.py", args, macs_speedup=macs_speedup,
                     total_ms={"dense": total_dense, "pruned": total_pruned}, rows=rows)


if __name__ == "__main__":
    main()
