"""How much of a MAC cut can any channel cut realise? Latency as a fixed part plus a part per MAC.

Times one torchvision model dense and cut to several MAC keeps (gates stripped, round_to 16,
random gammas, as ``speedup.py`` makes its variants), in the export's TorchScript and in
onnxruntime, in alternation (``benchmarks/timing.py``), and fits ``latency = fixed + slope * MACs`` per
runtime over all of them. The fixed part is what a channel cut cannot shrink: the cost of
calling each op, which stays while the op's work shrinks. If the rest shrank in full with the
MACs, a cut to ``1/x`` of the MACs would realise ``((fixed + slope*M) / (fixed + slope*M/x)) / x``
of its MAC speed-up: the ceiling printed beside each measured share (a share above its ceiling
means that cut's kernels did better than the fit's average MAC).

    python -m benchmarks latency_floor [--model mobilenet_v2] [--batch 1] [--keeps 0.75,0.5,0.35,0.25]
                                       [--image-size 224] [--threads N] [--json latency_floor_mnv2_bs1.json]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.speedup import pruned_variant
from benchmarks.timing import add_options, benchmark_parser, cpu_model, interleaved_ms, parse, runners, write_result
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import count_macs_params

RUNTIMES = ("torchscript", "ort")


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("latency_floor", __doc__)
    parser.add_argument("--model", default="mobilenet_v2", help="a model name nam-prune builds (speedup's --models)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--keeps", default="0.75,0.5,0.35,0.25", help="fractions of the MACs kept, one variant each")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per model and round")
    parser.add_argument("--rounds", type=int, default=9)
    add_options(parser, image_size=224)
    args = parse(parser, argv)
    try:
        keeps = [float(k) for k in args.keeps.split(",")]
    except ValueError:
        keeps = []
    if not keeps or not all(0 < k < 1 for k in keeps):
        parser.error(f"--keeps takes fractions between 0 and 1, not {args.keeps}")
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    models = [build_model(ModelSpec(args.model, num_classes=1000)).eval(),
              *(pruned_variant(args.model, 16, True, keep, size=args.image_size) for keep in keeps)]
    macs = np.array([count_macs_params(model, x[:1])[0] for model in models], dtype=float)
    with tempfile.TemporaryDirectory() as folder:
        calls = [{f"{runtime}_x": call[f"{runtime}_x"] for runtime in RUNTIMES}
                 for call in (runners(model, {"x": x}, Path(folder)) for model in models)]
        ms = interleaved_ms(calls, {"x": args.runs}, args.rounds, 2)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads, {cpu_model()}")
    fits, rows = {}, []
    for runtime in RUNTIMES:
        latency = np.array([m[f"{runtime}_x"] for m in ms])
        slope, fixed = np.polyfit(macs, latency, 1)
        fits[runtime] = {"fixed_ms": fixed, "ms_per_gmac": slope * 1e9, "fixed_share_of_dense": fixed / latency[0]}
        print(f"{runtime}: latency = {fixed:.2f} ms + {slope * 1e9:.2f} ms/GMAC; the fixed part is "
              f"{fixed / latency[0]:.0%} of the dense model's {latency[0]:.2f} ms")
        for model_macs, model_ms in zip(macs[1:], latency[1:]):
            speedup = macs[0] / model_macs
            realised = latency[0] / model_ms / speedup
            ceiling = (fixed + slope * macs[0]) / (fixed + slope * model_macs) / speedup
            print(f"  MACs x{speedup:.2f}: {model_ms:.2f} ms, realised {realised:.2f}, ceiling {ceiling:.2f}")
            rows.append({"runtime": runtime, "macs": model_macs, "macs_speedup": speedup, "ms": model_ms,
                         "realised": realised, "ceiling": ceiling})
    if args.json:
        write_result(args.json, parser, argv, macs=macs.tolist(),
                     dense_ms={r: ms[0][f"{r}_x"] for r in RUNTIMES}, fits=fits, rows=rows)

