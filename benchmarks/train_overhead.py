"""Cost of NAM in training: one ResNet-50 step with NAM gates + penalty vs the plain model.

Prints the time ratio (target <= 1.15x), measured in one run on the same machine.

    python benchmarks/train_overhead.py [--batch 8] [--size 224] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from nam_prune.gates import use_compiled_gates
from nam_prune.models import ModelSpec, build_model
from nam_prune.sparsity import apply_sparsity_penalty
from nam_prune.surgery import NAMConfig, insert_nam


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, penalty: float) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        apply_sparsity_penalty(model, penalty)
        optimizer.step()
        if i:  # the first step warms up allocators, kernels and compilation
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 1000, (args.batch,))
    plain = build_model(ModelSpec("resnet50", num_classes=1000))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {args.batch}, {args.size}px")
    for compiled in (False, True):
        use_compiled_gates(compiled)
        for placement in ("block_end", "every_bn"):
            gated = insert_nam(build_model(ModelSpec("resnet50", num_classes=1000)), NAMConfig(placement=placement))
            t_plain = step_time(plain, x, y, args.steps, 0.0)
            t_gated = step_time(gated, x, y, args.steps, 1e-4)
            mode = "compiled gates" if compiled else "eager gates"
            print(f"{mode:>14}, placement={placement:>9}: plain {t_plain:.2f} s, NAM {t_gated:.2f} s, "
                  f"ratio {t_gated / t_plain:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
