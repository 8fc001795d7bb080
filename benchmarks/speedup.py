"""Does a MAC cut become a real CPU speed-up? ResNet-50 and MobileNetV2 pruned to 50% of their MACs.

For each model: the dense torchvision model (no gates) against NAM-pruned variants
(``round_to`` 1/8/16/32, gates stripped after pruning, and one variant that keeps its gates),
at 224x224 (``--image-size``), batch 1 and 32, on the CPU in eager torch, in the frozen channels-last TorchScript
that ``nam-prune export --format torchscript`` writes (and ``report`` times), in that TorchScript
after ``torch.jit.optimize_for_inference`` (``tsopt``: one line after ``torch.jit.load``; it packs
the convolutions' weights once, which cannot be saved in the file), and in onnxruntime.
Prints ``latency speed-up / MACs speed-up`` (1.0 = the cut is fully realised), each runtime
against the dense model in the same runtime. The NAM gammas are random here (no training
offline). Latency follows the widths, and a global cut's widths follow the ranking: a residual
stream's channel scores as the mean of the gates on it, so with random gammas the streams are cut
least (ResNet-50 keeps 75-83% of them, the layers inside the blocks 56-75%). ``--scopes
global,local`` adds variants cut in local scope (every layer by the same share, the streams too) to
separate what the runtime realises from where the cut falls; the JSON rows keep each variant's
convolution widths (``--widths-only``: just those, no timing).

Models are timed in alternation (``benchmarks/timing.py``). Each round's dense and pruned calls are back to
back, so a round gives one paired ratio: the script prints the median of those with their quartiles
(the spread says how far a single run's ratio can be trusted); the JSON also keeps every round's
ratio and, as ``realised``, the ratio of the all-round medians that earlier runs reported.

    python -m benchmarks speedup [--models resnet50,mobilenet_v2] [--round-to 1,8,16] [--scopes global,local]
                                 [--widths-only] [--image-size 224] [--threads N] [--json NAME.json]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.timing import (
    add_options,
    benchmark_parser,
    interleaved_rounds,
    median_quartiles,
    parse,
    pooled_median_ms,
    round_speedups,
    runners,
    write_result,
)
from nam_prune.gates import NAMChannelGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, count_macs_params, prune_model
from nam_prune.surgery import NAMConfig, insert_nam, strip_gates

COLUMNS = ("torch_bs1", "torchscript_bs1", "tsopt_bs1", "ort_bs1", "torch_bs32", "torchscript_bs32", "tsopt_bs32", "ort_bs32")


def random_gated(name: str) -> torch.nn.Module:
    """Model ``name`` (1000 classes, seeded) with a NAM gate on every BN, its gammas drawn from
    [0.05, 1]: no training offline, so the ranking is random."""
    torch.manual_seed(0)
    model = insert_nam(build_model(ModelSpec(name, num_classes=1000)), NAMConfig()).eval()
    with torch.no_grad():
        for gate in model.modules():
            if isinstance(gate, NAMChannelGate):
                gate.gamma.uniform_(0.05, 1.0)
    return model


def pruned_variant(name: str, round_to: int, strip: bool, keep: float, scope: str = "global", size: int = 224):
    """``random_gated(name)`` cut to ``keep`` of its MACs at ``size`` px, its gates stripped if ``strip``."""
    model = random_gated(name)
    x = torch.zeros(1, 3, size, size)
    prune_model(model, x, PruneConfig(round_to=round_to, max_pruning_ratio=0.8, macs_keep=keep, scope=scope))
    return strip_gates(model) if strip else model


def paired_shares(speedups: list[float], macs_speedup: float) -> dict[str, object]:
    """Per-round realised shares, their median and their first and third quartiles (inclusive)."""
    return median_quartiles([s / macs_speedup for s in speedups])


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("speedup", __doc__)
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--round-to", default="1,8,16,32")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--scopes", default="global", help="prune.scope of the stripped variants, e.g. global,local "
                        "(local cuts every layer by the same share, the residual streams too)")
    parser.add_argument("--widths-only", action="store_true", help="only build the variants: their conv widths, no timing")
    parser.add_argument("--runs1", type=int, default=10, help="batch-1 calls per model and round")
    parser.add_argument("--runs32", type=int, default=1, help="batch-32 calls per model and round")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds (9: a quartile range per ratio)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each model's turn")
    add_options(parser, image_size=224)
    args = parse(parser, argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: each ratio comes with quartiles over rounds")
    scopes = args.scopes.split(",")
    if not set(scopes) <= {"global", "local"}:
        parser.error(f"--scopes takes global and/or local, not {args.scopes}")
    size = args.image_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {size}x{size}")
    header = f"{'model':>13} {'variant':>24} {'MACs x':>7} " + ("" if args.widths_only else " ".join(f"{k:>17}" for k in COLUMNS))
    rows = []
    for name in args.models.split(","):
        print(header)
        dense = build_model(ModelSpec(name, num_classes=1000)).eval()
        x1, x32 = torch.randn(1, 3, size, size), torch.randn(32, 3, size, size)
        dense_macs = count_macs_params(dense, x1)[0]
        variants = [(int(r), True, s) for s in scopes for r in args.round_to.split(",")] + [(8, False, "global")]
        models = [pruned_variant(name, round_to, strip, args.keep, scope, size) for round_to, strip, scope in variants]
        labels = [f"round_to={r}" + ("" if strip else " +gates") + ("" if scopes == ["global"] else f" {scope}")
                  for r, strip, scope in variants]
        if args.widths_only:
            for model, label in zip([dense, *models], ["dense", *labels]):
                macs_x = dense_macs / count_macs_params(model, x1)[0]
                print(f"{name:>13} {label:>24} {macs_x:7.2f}")
                rows.append({"model": name, "variant": label, "macs_speedup": macs_x, "channels": conv_widths(model)})
            continue
        with tempfile.TemporaryDirectory() as folder:
            calls = [runners(model, {"bs1": x1, "bs32": x32}, Path(folder), optimized=True) for model in [dense, *models]]
            timed = interleaved_rounds(calls, {"bs1": args.runs1, "bs32": args.runs32}, args.rounds, args.warmup)
        base, *pruned = ([pooled_median_ms(samples)[column] for column in COLUMNS] for samples in timed)
        print(f"{name:>13} {'dense':>24} {1.0:7.2f} " + " ".join(f"{t:14.1f} ms" for t in base))
        rows.append({"model": name, "variant": "dense", "macs_speedup": 1.0, "ms": dict(zip(COLUMNS, base)),
                     "channels": conv_widths(dense)})
        for model, label, lat, samples in zip(models, labels, pruned, timed[1:]):
            macs_x = dense_macs / count_macs_params(model, x1)[0]
            realised = [(b / t) / macs_x for b, t in zip(base, lat)]
            paired = [paired_shares(round_speedups(timed[0][c], samples[c]), macs_x) for c in COLUMNS]
            print(f"{name:>13} {label:>24} {macs_x:7.2f} " + " ".join(
                f"{p['median']:5.2f} ({p['quartiles'][0]:.2f}-{p['quartiles'][1]:.2f})" for p in paired))
            rows.append({"model": name, "variant": label, "macs_speedup": macs_x, "ms": dict(zip(COLUMNS, lat)),
                         "realised": dict(zip(COLUMNS, realised)), "realised_paired": dict(zip(COLUMNS, paired)),
                         "channels": conv_widths(model)})
    if not args.widths_only:
        print("(pruned rows: latency speed-up / MACs speed-up, each runtime against the dense model in it: the median "
              "and quartiles of the per-round paired ratios; JSON 'realised' is the ratio of all-round medians; targets: "
              "ResNet-50 bs1 >= 0.8, bs32 >= 0.95, MobileNetV2 bs1 >= 0.7)")
    if args.json:
        write_result(args.json, parser, argv, rows=rows)


def conv_widths(model: torch.nn.Module) -> dict[str, int]:
    """Each convolution's output channels: where the cut fell."""
    return {name: module.out_channels for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)}

