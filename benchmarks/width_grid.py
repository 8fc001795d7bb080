"""Which layer widths realise a MAC cut? Small CIFAR ResNets on 28x28 inputs, batch 32.

The dense net (``--depth``, ``--width``: stage widths w, 2w, 4w) against copies with other stage
widths, each written ``residual/inner`` per stage (``8,24,48/8,24,56``: 8-channel first stage,
24 and 48 residual channels after, the blocks' inner convs 8, 24 and 56 wide), as a pruned model
of it would be. Prints per width pattern its MAC speed-up and ``latency speed-up / MACs
speed-up`` in eager torch, frozen channels-last TorchScript and onnxruntime (1.0 = the cut is
fully realised), the models timed in alternation (``timing.py``). Weights are random: widths,
not values, set latency. This is how the quickstart's net and round_to 16 were chosen (README,
*Performance*).

    python benchmarks/width_grid.py --depth 20 --width 16 8,24,48/8,24,56 16,16,48/16,16,48 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from timing import allocator_env, command_line, interleaved_ms, runners

from nam_prune.models import CifarResNet
from nam_prune.prune import count_macs_params


def parse_widths(text: str) -> tuple[list[int], list[int]]:
    residual, inner = ([int(w) for w in part.split(",")] for part in text.split("/"))
    if len(residual) != 3 or len(inner) != 3:
        raise SystemExit(f"widths {text!r}: write three residual and three inner widths, e.g. 8,24,48/8,24,56")
    return residual, inner


def narrowed(depth: int, width: int, residual: list[int], inner: list[int]) -> nn.Module:
    """``CifarResNet(depth, width=width)`` with every conv re-made at the given stage widths."""
    model = CifarResNet(depth, num_classes=10, in_channels=1, width=width)
    model.conv1, model.bn1 = nn.Conv2d(1, residual[0], 3, padding=1, bias=False), nn.BatchNorm2d(residual[0])
    previous = residual[0]
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3)):
        for block in layer:
            stride = block.conv1.stride
            block.conv1 = nn.Conv2d(previous, inner[stage], 3, stride=stride, padding=1, bias=False)
            block.bn1 = nn.BatchNorm2d(inner[stage])
            block.conv2 = nn.Conv2d(inner[stage], residual[stage], 3, padding=1, bias=False)
            block.bn2 = nn.BatchNorm2d(residual[stage])
            if block.downsample is not None:
                block.downsample = nn.Sequential(
                    nn.Conv2d(previous, residual[stage], 1, stride=stride, bias=False), nn.BatchNorm2d(residual[stage])
                )
            previous = residual[stage]
    model.fc = nn.Linear(previous, 10)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patterns", nargs="+", help="residual/inner stage widths, e.g. 8,24,48/8,24,56")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per model and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = CifarResNet(args.depth, num_classes=10, in_channels=1, width=args.width).eval()
    models = {"dense": dense} | {p: narrowed(args.depth, args.width, *parse_widths(p)) for p in args.patterns}
    example = torch.randn(1, 1, 28, 28)
    batch = example.expand(args.batch, -1, -1, -1).contiguous()
    macs = {label: count_macs_params(model, example)[0] for label, model in models.items()}
    with tempfile.TemporaryDirectory() as scratch:
        calls = [runners(model, {"batch": batch}, Path(scratch)) for model in models.values()]
        times = interleaved_ms(calls, {"batch": args.runs}, rounds=args.rounds, warmup=3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-{args.depth} width {args.width}, "
          f"batch {args.batch}, 28x28; realised share = latency speed-up / MACs speed-up")
    rows = []
    for (label, model_macs), ms in zip(macs.items(), times):
        macs_speedup = macs["dense"] / model_macs
        realised = {column.split("_")[0]: times[0][column] / ms[column] / macs_speedup for column in ms}
        rows.append({"widths": label, "macs": model_macs, "macs_speedup": macs_speedup, "ms": ms, "realised": realised})
        print(f"{label:>22}  MACs {macs_speedup:4.2f}x  " + "  ".join(
            f"{runtime} {ms[column]:6.2f} ms ({share:.2f})" for (runtime, share), column in zip(realised.items(), ms)))
    if args.json:
        args.json.write_text(json.dumps({
            "command": command_line("python benchmarks/width_grid.py " + " ".join(sys.argv[1:])),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "allocator_env": allocator_env(),
            "depth": args.depth, "width": args.width, "batch": args.batch, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
