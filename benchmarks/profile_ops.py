"""Where does a pruned model's time go? Dense against pruned, op by op (ResNet-50 at batch 32 by default).

Profiles (torch.profiler, CPU) a few calls of each model in the form ``export --format torchscript``
writes (frozen, channels-last, in slices), the pruned one as ``speedup`` makes it (50% of the
MACs, round_to 16), and sums each op's own time by op and by the height of its input map: which
stages realise their cut and which do not. ``--onednn`` also sums the time oneDNN's own kernels
report (its verbose log, per primitive and implementation, with each kind's MACs): what the
kernels realise apart from the per-op cost around them, and the models' wall time without the
profiler. The two models' calls alternate throughout (call by call in the profiled passes, round
by round in the wall timing), but each pass is separate and the profiler and the log add their own
cost: the ratios here explain, ``speedup`` measures.

    python -m benchmarks profile_ops [--model resnet50] [--batch 32] [--onednn] [--image-size 224] [--threads N]
                                     [--json profile_ops_resnet50_bs32.json]
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.speedup import pruned_variant
from benchmarks.timing import add_options, benchmark_parser, cpu_model, interleaved_ms, parse, write_result
from nam_prune.export import frozen_torchscript
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import count_macs_params


def warm_frozen(model: torch.nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """``model`` in the export's form, called twice: the first calls of a frozen module optimize its graph."""
    frozen = frozen_torchscript(model, x)
    with torch.inference_mode():
        for _ in range(2):
            frozen(x)
    return frozen


def op_ms(frozen: list[torch.jit.ScriptModule], x: torch.Tensor, calls: int) -> list[dict[str, float]]:
    """Per model, milliseconds per call of each op's own time, keyed ``op@height`` (``op`` for inputs
    of another rank). Each call is profiled on its own and the models' calls alternate, so a slow
    spell of the machine hits them alike."""
    totals: list[collections.Counter[str]] = [collections.Counter() for _ in frozen]
    with torch.inference_mode():
        for _ in range(calls):
            for module, total in zip(frozen, totals):
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    module(x)
                for event in prof.key_averages(group_by_input_shape=True):
                    if event.key.startswith("aten::"):
                        shapes = event.input_shapes
                        where = f"@{shapes[0][2]}px" if shapes and len(shapes[0]) == 4 else ""
                        total[event.key + where] += event.self_cpu_time_total / 1000 / calls
    return [dict(total) for total in totals]


@contextlib.contextmanager
def stdout_fd_to(path: Path) -> Iterator[None]:
    """Append file descriptor 1 to ``path``: oneDNN prints its verbose log from C, past ``sys.stdout``
    (C's own stdout buffer is flushed before the descriptor goes back, so no line lands elsewhere)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with path.open("a") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def convolution_macs(problem: str) -> int:
    """Multiply-accumulates of one oneDNN convolution from its verbose problem string, such as
    ``g32mb1_ic32oc32_ih112oh112kh3sh1dh0ph1_iw112ow112kw3sw1dw0pw1`` (a 1D or 3D one counts 0)."""
    sizes = {key: int(value) for key, value in re.findall(r"(g|mb|ic|oc|oh|ow|kh|kw)(\d+)", problem)}
    if not {"mb", "ic", "oc", "oh", "ow", "kh", "kw"} <= sizes.keys():
        return 0
    return (sizes["mb"] * sizes["oc"] * sizes["oh"] * sizes["ow"] * sizes["ic"] // sizes.get("g", 1)
            * sizes["kh"] * sizes["kw"])


def onednn_kernels(
    frozen: list[torch.jit.ScriptModule], x: torch.Tensor, calls: int
) -> list[dict[str, dict[str, float]]]:
    """Per model, the milliseconds per call that oneDNN's kernels report and their MACs
    (convolutions), keyed ``primitive:implementation``; ops that ATen runs itself, such as its own
    1x1 convolution for small batch-1 maps, are not in it. The models' calls alternate, so a slow
    spell of the machine hits them alike."""
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        logs = [Path(folder) / f"{index}.log" for index in range(len(frozen))]
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for _ in range(calls):
                for module, log in zip(frozen, logs):
                    with stdout_fd_to(log):
                        module(x)
        return [kernel_totals(log.read_text(), calls) for log in logs]


def kernel_totals(log: str, calls: int) -> dict[str, dict[str, float]]:
    """Milliseconds and MACs per call of each ``primitive:implementation`` in a oneDNN verbose log."""
    totals: collections.Counter[str] = collections.Counter()
    macs: collections.Counter[str] = collections.Counter()
    for line in log.splitlines():
        fields = line.split(",")
        if len(fields) > 6 and fields[2:4] == ["primitive", "exec"]:
            key = f"{fields[5]}:{fields[6]}"
            totals[key] += float(fields[-1]) / calls
            macs[key] += convolution_macs(fields[-2]) / calls
    return {key: {"ms": totals[key], "macs": macs[key]} for key in totals}


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("profile_ops", __doc__)
    parser.add_argument("--model", default="resnet50", help="a model name nam-prune builds (speedup's --models)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--onednn", action="store_true", help="also sum oneDNN's kernel times; time both models unprofiled")
    add_options(parser, image_size=224)
    args = parse(parser, argv)
    dense = build_model(ModelSpec(args.model, num_classes=1000)).eval()
    pruned = pruned_variant(args.model, 16, True, 0.5, size=args.image_size)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    macs_speedup = count_macs_params(dense, x[:1])[0] / count_macs_params(pruned, x[:1])[0]
    frozen = [warm_frozen(model, x) for model in (dense, pruned)]
    dense_ms, pruned_ms = op_ms(frozen, x, args.calls)
    rows = sorted(
        ({"op": key, "dense_ms": dense_ms.get(key, 0.0), "pruned_ms": pruned_ms.get(key, 0.0)}
         for key in set(dense_ms) | set(pruned_ms)),
        key=lambda row: -row["dense_ms"],
    )
    total_dense, total_pruned = sum(dense_ms.values()), sum(pruned_ms.values())
    print(f"{cpu_model()}; MACs speed-up {macs_speedup:.2f}; ops taking 1% of the dense time or more:")
    for row in rows:
        if max(row["dense_ms"], row["pruned_ms"]) >= total_dense / 100:
            speedup = row["dense_ms"] / row["pruned_ms"] if row["pruned_ms"] else float("inf")
            print(f"{row['op']:40s} {row['dense_ms']:8.2f} ms {row['pruned_ms']:8.2f} ms  x{speedup:.2f}")
    print(f"{'all ops':40s} {total_dense:8.2f} ms {total_pruned:8.2f} ms  x{total_dense / total_pruned:.2f}"
          f"  realised {total_dense / total_pruned / macs_speedup:.2f}")
    fields: dict[str, object] = {}
    if args.onednn:
        kernels = onednn_kernels(frozen, x, args.calls)
        absent = {"ms": 0.0, "macs": 0.0}
        for key in sorted(set(kernels[0]) | set(kernels[1]), key=lambda key: -kernels[0].get(key, absent)["ms"]):
            before, after = (k.get(key, absent) for k in kernels)
            share = (f"  MACs x{before['macs'] / after['macs']:.2f}, "
                     f"realised {before['ms'] / after['ms'] / (before['macs'] / after['macs']):.2f}"
                     if before["macs"] and after["macs"] else "")
            print(f"oneDNN {key:33s} {before['ms']:8.2f} ms {after['ms']:8.2f} ms{share}")
        kernel_dense, kernel_pruned = (sum(kernel["ms"] for kernel in k.values()) for k in kernels)
        print(f"{'oneDNN kernels':40s} {kernel_dense:8.2f} ms {kernel_pruned:8.2f} ms  x{kernel_dense / kernel_pruned:.2f}"
              f"  realised {kernel_dense / kernel_pruned / macs_speedup:.2f}")
        wall = [ms["torchscript_x"] for ms in interleaved_ms(
            [{"torchscript_x": lambda f=f: f(x)} for f in frozen], {"x": max(args.calls // 5, 2)}, 5, 2)]
        print(f"{'wall time, unprofiled, alternating':40s} {wall[0]:8.2f} ms {wall[1]:8.2f} ms  x{wall[0] / wall[1]:.2f}"
              f"  realised {wall[0] / wall[1] / macs_speedup:.2f}")
        fields["onednn"] = {"dense": kernels[0], "pruned": kernels[1]}
        fields["wall_ms"] = {"dense": wall[0], "pruned": wall[1]}
    if args.json:
        write_result(args.json, parser, argv, macs_speedup=macs_speedup,
                     total_ms={"dense": total_dense, "pruned": total_pruned}, rows=rows, **fields)

