"""NAM channel gate vs the reference ``Channel_Att``: forward + backward time and activation memory.

Prints, per shape, our time / reference time and our saved-activation bytes / reference's
(the memory autograd keeps for backward, which is what a gate adds to training), and checks
outputs and gradients agree within 1e-5. Targets: time <= 0.5x, memory <= 0.6x.

    python -m benchmarks nam_gate [--repeats 20] [--paths "kernel,torch ops,compiled"]
                                  [--shapes 32x64x32x32,32x256x16x16,8x512x7x7] [--threads N] [--json NAME.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune import gate_kernel
from nam_prune.gates import NAMChannelGate, use_compiled_gates

SHAPES = [(32, 64, 32, 32), (32, 256, 16, 16), (8, 512, 7, 7)]
PATHS = {
    "kernel": "fused CPU kernel (gate_kernel.c, the default where it builds)",
    "torch ops": "kernel off: plain module path (a gate on its own shares no host BN pass)",
    "compiled": "kernel off: torch.compile'd affine_sigmoid_gate (dynamic shapes)",
}


class ReferenceChannelAtt(nn.Module):
    """A faithful copy of the reference implementation (Christian-lyc/NAM, ``Channel_Att``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.bn2 = nn.BatchNorm2d(self.channels, affine=True)

    def forward(self, x):
        residual = x
        x = self.bn2(x)
        weight_bn = self.bn2.weight.data.abs() / torch.sum(self.bn2.weight.data.abs())
        x = x.permute(0, 2, 3, 1).contiguous()
        x = torch.mul(weight_bn, x)
        x = x.permute(0, 3, 1, 2).contiguous()
        x = torch.sigmoid(x) * residual
        return x


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (distinct storages, the input excluded: it exists anyway)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return sum(storages.values()) + out.untyped_storage().nbytes()


def step_time(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 3):
        x.grad = None
        start = time.perf_counter()
        module(x).backward(grad)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_equal(ours: nn.Module, ref: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    xa, xb = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    oa, ob = ours(xa), ref(xb)
    oa.backward(grad)
    ob.backward(grad)
    diffs = [
        (oa - ob).abs().max(),
        (xa.grad - xb.grad).abs().max(),
        (ours.bn.weight.grad - ref.bn2.weight.grad).abs().max(),
        (ours.bn.bias.grad - ref.bn2.bias.grad).abs().max(),
    ]
    return float(max(diffs).detach())


def shape_list(text: str) -> list[tuple[int, int, int, int]]:
    """``--shapes``: comma-separated NxCxHxW."""
    try:
        shapes = [tuple(int(size) for size in shape.split("x")) for shape in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 4 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"write shapes as NxCxHxW, comma-separated (e.g. 8x512x7x7), not {text!r}")
    return shapes


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("nam_gate", __doc__)
    parser.add_argument("--repeats", type=int, default=20, help="timed forward + backward passes per gate and shape")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"gate paths to time, comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--shapes", type=shape_list, default=SHAPES, help="input shapes NxCxHxW, comma-separated")
    add_options(parser)
    args = parse(parser, argv)
    paths = args.paths.split(",")
    if not set(paths) <= PATHS.keys():
        parser.error(f"--paths takes {', '.join(PATHS)}, not {args.paths}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    rows = []
    print(f"the kernel: {gate_kernel.status()}")
    for path in paths:
        use_compiled_gates(path == "compiled")
        print(f"-- {PATHS[path]}")
        try:
            with gate_kernel.disabled() if path != "kernel" else contextlib.nullcontext():
                rows += [{"path": path, **row} for row in compare(args.shapes, args.repeats)]
        finally:
            use_compiled_gates(False)
    if args.json:
        write_result(args.json, parser, argv, rows=rows)


def compare(shapes: list[tuple[int, int, int, int]], repeats: int) -> list[dict]:
    rows = []
    print(f"{'shape':>20} {'ours ms':>9} {'ref ms':>9} {'time ratio':>10} {'mem ratio':>9} {'max |diff|':>10}")
    for shape in shapes:
        ours, ref = NAMChannelGate(shape[1]), ReferenceChannelAtt(shape[1])
        with torch.no_grad():
            ours.bn.weight.uniform_(0.1, 1.0)
            ours.bn.bias.uniform_(-0.5, 0.5)
        ref.bn2.load_state_dict(ours.bn.state_dict())
        x = torch.randn(shape, requires_grad=True)
        grad = torch.randn(shape)
        diff = check_equal(ours, ref, x, grad)
        t_ours, t_ref = step_time(ours, x, grad, repeats), step_time(ref, x, grad, repeats)
        m_ours, m_ref = saved_bytes(ours, x), saved_bytes(ref, x)
        print(
            f"{str(shape):>20} {1e3 * t_ours:9.2f} {1e3 * t_ref:9.2f} {t_ours / t_ref:10.2f} "
            f"{m_ours / m_ref:9.2f} {diff:10.1e}"
        )
        assert diff < 1e-5, f"gate disagrees with the reference by {diff}"
        rows.append({"shape": list(shape), "time_ratio": t_ours / t_ref, "memory_ratio": m_ours / m_ref, "max_abs_diff": diff})
    return rows

