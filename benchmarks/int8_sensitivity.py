"""Which parts of a model lose its score in INT8: each top-level module kept in float, or quantized alone.

The FP32 ONNX file of a nam-prune checkpoint is quantized as ``nam-prune export MODEL --int8`` does
(``nam_prune.int8.quantize_onnx``), once with everything it quantizes, then once per top-level
module (``model.0``, ``layer1``, ...: the first part of onnxruntime's node names) with that
module's convolutions left in float (``--mode float``: how much of the loss that module's
quantization causes) or with only that module's convolutions quantized (``--mode alone``: how
much it loses by itself). A quantized input tensor is quantized for every module that reads it, and
what is not a convolution is quantized as ``export --int8`` does (a classifier's adds and pools stay
quantized). A detector's stem is quantized here too unless ``--float-stem`` keeps it float as
``export`` does. Each file is scored on the recipe's test split, as ``benchmarks int8`` scores it; the
modules come out ordered by how much they change the score.

    python -m benchmarks int8_sensitivity runs/NAME/model.pt [--mode float|alone] [--float-stem] [--data SPEC] [--json NAME.json]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.int8 import add_data_option, load_for_int8
from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune.export import write_onnx
from nam_prune.int8 import graph_nodes, quantize_onnx


def convolutions_by_module(path: Path) -> dict[str, list[str]]:
    """The convolution nodes of an ONNX file by the top-level module their name starts with."""
    modules: dict[str, list[str]] = {}
    for node in graph_nodes(path):
        if node.op_type == "Conv" and node.name.startswith("/"):
            modules.setdefault(node.name.split("/")[1], []).append(node.name)
    return modules


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("int8_sensitivity", __doc__)
    parser.add_argument("model", type=Path, help="a nam-prune checkpoint (a run's model.pt)")
    parser.add_argument("--mode", choices=("float", "alone"), default="float",
                        help="float: each module kept in float, the rest quantized; alone: each module quantized alone")
    parser.add_argument("--float-stem", action="store_true",
                        help="keep a detector's first two convolutions float, as export --int8 does (default: measure them too)")
    add_data_option(parser)
    add_options(parser)
    args = parse(parser, argv)
    model, record, task, data = load_for_int8(args.model, args.data)
    with tempfile.TemporaryDirectory() as scratch:
        fp32, int8 = Path(scratch) / "model.onnx", Path(scratch) / "model.int8.onnx"
        write_onnx(model, record.example_input(), fp32, deploy_mode=task.deploy_mode)
        modules = convolutions_by_module(fp32)
        every = [name for names in modules.values() for name in names]

        def score(keep_float: list[str]) -> float:
            quantize_onnx(fp32, int8, data, keep_float, float_stem=args.float_stem)
            return data.score(int8)

        fp32_score, int8_score = data.score(fp32), score([])
        print(f"{args.model}: {task.score_label()} FP32 {100 * fp32_score:.2f}%, INT8 {100 * int8_score:.2f}%")
        scores = {}
        for module, names in modules.items():
            scores[module] = score(names if args.mode == "float" else [n for n in every if n not in names])
            print(f"  {module} ({len(names)} convolutions) {'in float' if args.mode == 'float' else 'quantized alone'}: "
                  f"{100 * scores[module]:.2f}%", flush=True)
    reference = int8_score if args.mode == "float" else fp32_score
    ranked = sorted(scores, key=lambda m: abs(scores[m] - reference), reverse=True)
    print("most sensitive first: " + ", ".join(f"{m} ({100 * (scores[m] - reference):+.2f} pt)" for m in ranked[:5]))
    if args.json:
        write_result(args.json, parser, argv, model=str(args.model), mode=args.mode, float_stem=args.float_stem, score_key=task.score_key,
                     fp32=fp32_score, int8=int8_score, modules={m: scores[m] for m in ranked},
                     convolutions={m: len(modules[m]) for m in ranked}, test_images=data.test_images)
