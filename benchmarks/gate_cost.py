"""Do NAM gates slow learning? Top-1 after sparsity training, gated against plain, same seeds and data.

Each arm trains the same model from the same seed on the same Fashion-MNIST subset with the
quickstart's sparsity settings (SGD, cosine, polarization penalty 5e-3): ``plain`` penalises the BN
gammas and has no gates (BN-slimming with polarization); ``gated`` has a closing gate on every BN;
``gated_except`` has one on every BN whose name does not match ``--except`` (by default the
projection BNs of torchvision's MobileNetV2 inverted residuals, which no activation follows: a
gate there puts a non-linearity on the linear bottleneck). ``--gate-bias`` sets the gated arms'
``nam.gate_bias``. Top-1 on the test subset after the last epoch, per seed, and each gated arm's
mean difference to ``plain``.

    python -m benchmarks gate_cost [--model mobilenet_v2] [--image-size 32] [--epochs 6] [--seeds 0,1,2] [--gate-bias B] [--json NAME.json]
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

import torch

from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune.data import DataConfig, load_data
from nam_prune.models import ModelSpec, build_model
from nam_prune.sparsity import batchnorm_scales, gate_scales
from nam_prune.surgery import NAMConfig, insert_nam
from nam_prune.train import TrainConfig, evaluate, fit

ARMS = ("plain", "gated", "gated_except")
LINEAR_BOTTLENECKS = r"features\.\d+\.conv\.[23]"
"""torchvision MobileNetV2: the BN after each inverted residual's projection conv."""


def train_arm(arm: str, seed: int, args) -> float:
    """Top-1 of ``arm`` after ``args.epochs`` epochs of sparsity training from ``seed``."""
    torch.manual_seed(seed)
    data = load_data(DataConfig(name="fashion_mnist", train_subset=args.train_images, test_subset=args.test_images,
                                batch_size=128, image_size=args.image_size), seed)
    model = build_model(ModelSpec(args.model, 10, data.input_shape[0]))
    example = torch.zeros(1, *data.input_shape)
    penalised = batchnorm_scales
    if arm != "plain":
        norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        gated = norms if arm == "gated" else [name for name in norms if not re.fullmatch(args.except_, name)]
        if len(gated) == len(norms) and arm == "gated_except":
            raise SystemExit(f"--except {args.except_!r} matches no BatchNorm2d of {args.model}")
        insert_nam(model, NAMConfig(include=gated, gate_bias=args.gate_bias), example)
        penalised = gate_scales
    config = TrainConfig(epochs=args.epochs, penalty=5e-3, regularizer="polarization", optimizer="sgd", lr=0.1,
                         momentum=0.9, weight_decay=5e-4, schedule="cosine")
    fit(model, data.train, config, torch.device("cpu"), "sparsity", penalised=penalised)
    return evaluate(model, data.test, torch.device("cpu"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("gate_cost", __doc__)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--except", dest="except_", default=LINEAR_BOTTLENECKS,
                        help="gated_except: BN names (full match) left without a gate")
    parser.add_argument("--gate-bias", type=float, default=0.0, help="nam.gate_bias of the gated arms")
    add_options(parser, image_size=32)
    args = parse(parser, argv)
    seeds, arms = [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    top1 = {arm: [train_arm(arm, seed, args) for seed in seeds] for arm in arms}
    for arm, values in top1.items():
        line = f"{arm}: top-1 " + ", ".join(f"{100 * v:.2f}%" for v in values)
        if arm != "plain" and "plain" in top1:
            line += f"; {100 * statistics.mean(a - p for a, p in zip(values, top1['plain'])):+.2f} points against plain"
        print(line)
    if args.json:
        write_result(args.json, parser, argv, model=args.model, epochs=args.epochs, seeds=seeds, gate_bias=args.gate_bias,
                     top1=top1)
