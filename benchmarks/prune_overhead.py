"""nam-prune's pruning step vs a bare torch-pruning call with the same importance, on ResNet-50.

Both cut 30% of each layer's channels (local scope, same ``NAMImportance``); ours also
counts parameters before and after to refuse a step that removed nothing. Target <= 1.2x.

    python benchmarks/prune_overhead.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch_pruning as tp

from nam_prune.gates import NAMChannelGate, tracing_mode
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import NAMImportance, PruneConfig, prune_model
from nam_prune.surgery import NAMConfig, insert_nam


def bare_torch_pruning(model, x):
    with tracing_mode(model):
        pruner = tp.pruner.BasePruner(
            model, x, importance=NAMImportance(model), pruning_ratio=0.3, ignored_layers=[model.fc]
        )
        pruner.step()


def ours(model, x):
    prune_model(model, x, PruneConfig(target="channels", scope="local", channel_ratio=0.3, round_to=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = insert_nam(build_model(ModelSpec("resnet50", num_classes=1000)), NAMConfig()).eval()
    with torch.no_grad():
        for gate in model.modules():
            if isinstance(gate, NAMChannelGate):
                gate.gamma.uniform_(0.05, 1.0)
    x = torch.zeros(1, 3, 224, 224)
    timings = {"torch-pruning": [], "nam-prune": []}
    for _ in range(args.repeats):
        for label, fn in (("torch-pruning", bare_torch_pruning), ("nam-prune", ours)):
            work = copy.deepcopy(model)
            start = time.perf_counter()
            fn(work, x)
            timings[label].append(time.perf_counter() - start)
    bare, mine = statistics.median(timings["torch-pruning"]), statistics.median(timings["nam-prune"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, ResNet-50 224px")
    print(f"bare torch-pruning {bare:.2f} s, nam-prune {mine:.2f} s, ratio {mine / bare:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
