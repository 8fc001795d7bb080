"""Does a MAC cut become a real CPU speed-up? ResNet-50 and MobileNetV2 pruned to 50% of their MACs.

For each model: the dense torchvision model (no gates) against NAM-pruned variants
(``round_to`` 1/8/16, gates stripped after pruning, and one variant that keeps its gates),
at 224x224, batch 1 and 32, in torch and onnxruntime on the CPU. Prints
``latency speed-up / MACs speed-up`` (1.0 = the cut is fully realised). The NAM gammas are
random here (no training offline); the ranking does not change latency, the widths do.

    python benchmarks/speedup.py [--models resnet50,mobilenet_v2] [--round-to 1,8,16]
"""

from __future__ import annotations

import argparse

import torch

from nam_prune.export import ort_latency_ms
from nam_prune.gates import NAMChannelGate
from nam_prune.measure import cpu_latency_ms
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruneConfig, count_macs_params, prune_model
from nam_prune.surgery import NAMConfig, insert_nam, strip_gates


def latencies(model, x1, x32, args) -> list[float]:
    """Seconds: torch bs 1, torch bs 32, onnxruntime bs 1, onnxruntime bs 32 (medians)."""
    return [
        cpu_latency_ms(model, x1, args.runs1, 1) / 1e3,
        cpu_latency_ms(model, x32, args.runs32, 1) / 1e3,
        ort_latency_ms(model, x1, args.runs1, 1) / 1e3,
        ort_latency_ms(model, x32, args.runs32, 1) / 1e3,
    ]


def pruned_variant(name: str, round_to: int, strip: bool, keep: float):
    torch.manual_seed(0)
    model = insert_nam(build_model(ModelSpec(name, num_classes=1000)), NAMConfig()).eval()
    with torch.no_grad():
        for gate in model.modules():
            if isinstance(gate, NAMChannelGate):
                gate.gamma.uniform_(0.05, 1.0)
    x = torch.zeros(1, 3, 224, 224)
    prune_model(model, x, PruneConfig(round_to=round_to, max_pruning_ratio=0.8, macs_keep=keep))
    return strip_gates(model) if strip else model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--round-to", default="1,8,16,32")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of MACs kept")
    parser.add_argument("--runs1", type=int, default=20)
    parser.add_argument("--runs32", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, 224x224")
    header = f"{'model':>13} {'variant':>18} {'MACs x':>7} " + " ".join(
        f"{k:>13}" for k in ("torch bs1", "torch bs32", "ort bs1", "ort bs32")
    )
    for name in args.models.split(","):
        print(header)
        dense = build_model(ModelSpec(name, num_classes=1000)).eval()
        x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(32, 3, 224, 224)
        dense_macs = count_macs_params(dense, x1)[0]
        base = latencies(dense, x1, x32, args)
        print(f"{name:>13} {'dense':>18} {1.0:7.2f} " + " ".join(f"{1e3 * t:10.1f} ms" for t in base))
        variants = [(int(r), True) for r in args.round_to.split(",")] + [(8, False)]
        for round_to, strip in variants:
            model = pruned_variant(name, round_to, strip, args.keep)
            macs_x = dense_macs / count_macs_params(model, x1)[0]
            lat = latencies(model, x1, x32, args)
            label = f"round_to={round_to}" + ("" if strip else " +gates")
            ratios = " ".join(f"{(b / t) / macs_x:13.2f}" for b, t in zip(base, lat))
            print(f"{name:>13} {label:>18} {macs_x:7.2f} {ratios}")
        print("(pruned rows: latency speed-up / MACs speed-up; targets: ResNet-50 bs1 >= 0.8, bs32 >= 0.95, "
              "MobileNetV2 bs1 >= 0.6)")


if __name__ == "__main__":
    main()
