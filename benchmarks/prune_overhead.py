"""nam-prune's pruning step vs a bare torch-pruning call with the same importance, on ResNet-50.

Both cut 30% of each layer's channels (local scope, same ``NAMImportance``, the classifier head
left whole); ours also counts parameters before and after to refuse a step that removed nothing.
Target <= 1.2x.

    python -m benchmarks prune_overhead [--repeats 3] [--model resnet50] [--image-size 224] [--threads N]
                                        [--json NAME.json]
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
import torch_pruning as tp

from benchmarks.speedup import random_gated
from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune.gates import tracing_mode
from nam_prune.prune import NAMImportance, PruneConfig, prune_model
from nam_prune.prune.graph import head_layers


def bare_torch_pruning(model, x):
    with tracing_mode(model):
        pruner = tp.pruner.BasePruner(
            model, x, importance=NAMImportance(model), pruning_ratio=0.3, ignored_layers=head_layers(model)
        )
        pruner.step()


def ours(model, x):
    prune_model(model, x, PruneConfig(target="channels", scope="local", channel_ratio=0.3, round_to=1))


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("prune_overhead", __doc__)
    parser.add_argument("--repeats", type=int, default=3, help="pruning steps timed per tool")
    parser.add_argument("--model", default="resnet50", help="a model name nam-prune builds (speedup's --models)")
    add_options(parser, image_size=224)
    args = parse(parser, argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    model = random_gated(args.model)
    x = torch.zeros(1, 3, args.image_size, args.image_size)
    timings = {"torch-pruning": [], "nam-prune": []}
    for _ in range(args.repeats):
        for label, fn in (("torch-pruning", bare_torch_pruning), ("nam-prune", ours)):
            work = copy.deepcopy(model)
            start = time.perf_counter()
            fn(work, x)
            timings[label].append(time.perf_counter() - start)
    bare, mine = statistics.median(timings["torch-pruning"]), statistics.median(timings["nam-prune"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.model} {args.image_size}px")
    print(f"bare torch-pruning {bare:.2f} s, nam-prune {mine:.2f} s, ratio {mine / bare:.2f} (target <= 1.2)")
    if args.json:
        write_result(args.json, parser, argv, model=args.model, torch_pruning_s=bare, nam_prune_s=mine, ratio=mine / bare,
                     seconds=timings)
