"""INT8 hand-off: onnxruntime static quantization of a run's model, calibrated on its recipe's training
images, checked to run and scored beside the FP32 file on real Fashion-MNIST; one-line errors."""

import json
import re
import shutil
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from conftest import QUICKSTART, TINY, cli
from onnxruntime.quantization import CalibrationDataReader

from nam_prune import distributed
from nam_prune.artifact import load_with_metadata, record_of, save
from nam_prune.compare import compare
from nam_prune.errors import NamPruneError
from nam_prune.export import write_onnx
from nam_prune.int8 import (
    CalibrationBatches,
    Int8Data,
    convolution_free_tail,
    fixed_batch_parts,
    graph_nodes,
    leading_convolutions,
    ort_top1,
    quantize_onnx,
)
from nam_prune.pipeline import _int8_data, run
from nam_prune.recipe import load_recipe
from nam_prune.tasks import ClassificationTask

INT8_TOLERANCE = 0.02
"""Most INT8 top-1 may lose against FP32 ONNX here: 5 of 256 test images (MinMax ranges of 512 images)."""


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, fashion_root):
    """One tiny real run on 512 Fashion-MNIST images that ends in INT8 (export.int8): its folder and results."""
    folder = tmp_path_factory.mktemp("int8") / "run"
    recipe = load_recipe(QUICKSTART, [*TINY, "report.baseline=false",
                                      "export.int8=true", f"data.root={fashion_root}", f"output={folder}"])
    result = run(recipe)
    return result.folder, result.results


@pytest.fixture
def checkpoint(int8_run, tmp_path):
    """The run's model.pt alone in a folder of this test's."""
    copy = tmp_path / "model.pt"
    shutil.copyfile(int8_run[0] / "model.pt", copy)
    return copy


def one_line_error(done, message: str) -> None:
    """Exit 2 and ``message`` on the one line besides the log (loading a run's model logs its gates)."""
    assert done.returncode == 2 and message in done.stderr, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("error: ")


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_a_recipe_can_end_in_int8(int8_run):
    folder, results = int8_run
    int8 = results["int8"]
    assert (int8["fp32_file"], int8["int8_file"]) == (str(folder / "model.onnx"), str(folder / "model.int8.onnx"))
    assert (int8["calibration_images"], int8["test_images"]) == (512, 256)
    assert int8["fp32_accuracy"] == pytest.approx(results["after"]["accuracy"], abs=1 / 256)  # the same model, in ONNX
    assert int8["int8_accuracy"] > 0.6  # trained: chance is 0.1
    assert abs(int8["int8_accuracy"] - int8["fp32_accuracy"]) <= INT8_TOLERANCE
    assert int8["fp32_latency_ms"] > 0 and int8["int8_latency_ms"] > 0
    assert json.loads((folder / "results.json").read_text())["int8"] == int8
    graph = onnx.load(folder / "model.int8.onnx").graph
    weights = {t.name: t for t in graph.initializer}
    quantized = [weights[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert sum(1 for w in quantized if w.data_type == onnx.TensorProto.INT8 and len(w.dims) == 4) >= 9  # every conv
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(weights[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in activations)  # U8S8
    scales = [weights[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert max(s.dims[0] if s.dims else 1 for s in scales) > 1  # per output channel


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_onnxruntime_runs_every_convolution_of_the_int8_file_in_int8(int8_run, tmp_path):
    """U8S8: the CPU kernels fuse each dequantize-Conv-quantize into QLinearConv (with S8S8 most convolutions
    stay float, between dequantize and quantize nodes, slower than the FP32 file)."""
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath, options.log_severity_level = str(tmp_path / "optimized.onnx"), 3
    onnxruntime.InferenceSession(str(int8_run[0] / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert (ops["QLinearConv"], ops["Conv"]) == (9, 0)  # ResNet-8: stem, two per block, two downsamples


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_the_int8_file_runs_alone_and_scores_as_recorded(int8_run, fashion_small):
    """Plain onnxruntime sessions, one image at a time, on the run's own 256 test images."""
    folder, results = int8_run
    images, labels = map(torch.cat, zip(*fashion_small.test))
    scores = {}
    for name in ("model.onnx", "model.int8.onnx"):
        session = onnxruntime.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(None, {"input": x[None].numpy()})[0] for x in images])
        scores[name] = float((logits.argmax(1) == labels.numpy()).mean())
    assert scores == {"model.onnx": results["int8"]["fp32_accuracy"], "model.int8.onnx": results["int8"]["int8_accuracy"]}


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_export_int8_calibrates_on_the_recipe_the_checkpoint_stores(checkpoint, int8_run):
    done = cli("export", str(checkpoint), "--int8")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model.int8.onnx", "model.onnx", "model.pt"]
    assert "calibrated on 512 training images" in done.stderr
    printed = re.search(r"top-1 on 256 test images: FP32 ONNX ([\d.]+)%, INT8 ([\d.]+)% \(([+-][\d.]+) pt\)", done.stderr)
    recorded = int8_run[1]["int8"]  # the same images, so the same ranges and the same INT8 file
    assert [float(v) for v in printed.groups()] == pytest.approx(
        [100 * recorded["fp32_accuracy"], 100 * recorded["int8_accuracy"],
         100 * (recorded["int8_accuracy"] - recorded["fp32_accuracy"])], abs=0.006)


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_an_int8_file_with_a_dynamic_batch_runs_any_batch(checkpoint, fashion_small):
    done = cli("export", str(checkpoint), "--int8", "--dynamic-batch", "-o", str(checkpoint.parent / "dynamic.onnx"))
    assert done.returncode == 0, done.stderr
    session = onnxruntime.InferenceSession(str(checkpoint.parent / "dynamic.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    images, _ = next(iter(fashion_small.test))
    assert session.run(None, {"input": images[:3].numpy()})[0].shape == (3, 10)


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_a_fixed_batch_session_scores_every_image(int8_run, fashion_small, tmp_path):
    """A file fixed to batch 4 reads 256 test images in 64-image loader batches and the same top-1 as at
    batch 1; calibration batches fill the last part with copies of its final image."""
    model, _ = load_with_metadata(int8_run[0] / "model.pt")
    for size in (1, 4):
        write_onnx(model, torch.zeros(size, 1, 28, 28), tmp_path / f"bs{size}.onnx")
    top1 = {size: ort_top1(onnxruntime.InferenceSession(str(tmp_path / f"bs{size}.onnx")), fashion_small.test) for size in (1, 4)}
    assert top1[1] == top1[4] == pytest.approx(int8_run[1]["int8"]["fp32_accuracy"], abs=1 / 256)
    parts = fixed_batch_parts(torch.arange(5.0).view(5, 1, 1, 1), 2)
    assert [p.ravel().tolist() for p in parts] == [[0, 1], [2, 3], [4, 4]]
    reader = CalibrationBatches([torch.zeros(3, 1, 2, 2)], 2)
    assert isinstance(reader, CalibrationDataReader)
    assert [reader.get_next()["input"].shape for _ in range(2)] == [(2, 1, 2, 2)] * 2 and reader.get_next() is None


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
@pytest.mark.parametrize(("data", "shape"), [({"image_size": 32}, "(1, 32, 32)"), ({"channels": 3}, "(3, 28, 28)")])
def test_calibration_data_of_another_shape_is_a_one_line_error(checkpoint, fashion_root, data, shape):
    recipe = checkpoint.parent / "other.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"root": str(fashion_root), "train_subset": 64, "test_subset": 64, **data}}))
    done = cli("export", str(checkpoint), "--int8", "--calibration", str(recipe))
    one_line_error(done, f"the calibration data gives inputs {shape} but the model takes (1, 28, 28)")
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model.pt", "other.yaml"]


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_a_classifier_is_not_calibrated_on_a_detection_data_yaml(checkpoint):
    data_yaml = checkpoint.parent / "detect.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": ".", "train": "images", "val": "images", "names": {0: "item"}}))
    one_line_error(cli("export", str(checkpoint), "--int8", "--calibration", str(data_yaml)),
                   "a classifier calibrates on a data set name or a recipe .yaml, not an ultralytics data yaml")
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["detect.yaml", "model.pt"]


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--calibration", "fashion_mnist"], "--calibration names the data --int8 calibrates on: add --int8 or drop it"),
     (["--format", "torchscript", "--int8"], "--int8 is for --format onnx and this export is torchscript: drop it")],
)
@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_int8_options_out_of_place_are_refused(checkpoint, options, message):
    one_line_error(cli("export", str(checkpoint), *options), message)
    assert list(checkpoint.parent.iterdir()) == [checkpoint]


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_a_checkpoint_without_a_recipe_needs_calibration_data_named(checkpoint):
    """``export --int8`` refuses in one line; ``report --onnx`` gives FP32 latency alone and says why."""
    model, payload = load_with_metadata(checkpoint)
    save(checkpoint, model, record_of(payload))  # no recipe, as a model saved through the API
    one_line_error(cli("export", str(checkpoint), "--int8"),
                   f"{checkpoint} stores no recipe to calibrate on: name the data with --calibration")
    assert list(checkpoint.parent.iterdir()) == [checkpoint]
    report = cli("report", str(checkpoint), "--json", "--onnx")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["onnx_latency_ms"] > 0 and "onnx_int8_latency_ms" not in summary
    assert "no INT8 onnxruntime latency" in report.stderr and "name the data with --data" in report.stderr


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_report_onnx_adds_int8_latency_from_the_stored_recipe(checkpoint):
    report = cli("report", str(checkpoint), "--json", "--onnx")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["onnx_latency_ms"] > 0 and summary["onnx_int8_latency_ms"] > 0
    assert ["onnx_int8_latency_ms", "onnxruntime INT8 ms"] in summary["columns"]
    assert list(checkpoint.parent.iterdir()) == [checkpoint]  # its ONNX files were temporary


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_missing_onnxruntime_is_the_install_hint(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    one_line_error(cli("export", str(checkpoint), "--int8"), "pip install 'nam-prune[onnx]'")
    assert list(checkpoint.parent.iterdir()) == [checkpoint]


@pytest.mark.slow  # needs the module's real run with export.int8 (10 s to set up)
def test_a_quantization_that_fails_leaves_neither_file(checkpoint, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("unsupported operator\nsecond line")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", fails)
    one_line_error(cli("export", str(checkpoint), "--int8"), "INT8 quantization failed (RuntimeError: unsupported operator)")
    assert list(checkpoint.parent.iterdir()) == [checkpoint]


class _Exp(torch.nn.Module):
    """No operator onnxruntime quantizes."""

    def forward(self, x):
        return x.exp()


def test_a_model_onnxruntime_cannot_quantize_is_a_one_line_error(tmp_path):
    write_onnx(_Exp(), torch.zeros(1, 1, 4, 4), tmp_path / "exp.onnx")
    data = Int8Data((1, 4, 4), lambda _shape: [torch.rand(8, 1, 4, 4)], 8, lambda path: 0.0, 0)
    with pytest.raises(NamPruneError, match=r"^onnxruntime quantized nothing in this model \(no operator it quantizes") as error:
        quantize_onnx(tmp_path / "exp.onnx", tmp_path / "exp.int8.onnx", data)
    assert "\n" not in str(error.value) and sorted(p.name for p in tmp_path.iterdir()) == ["exp.onnx"]


def test_the_recipe_key_is_off_by_default_and_typed():
    assert load_recipe(QUICKSTART).export.int8 is False
    assert load_recipe(QUICKSTART, ["export.int8=true"]).export.int8 is True
    for override, message in [
        ("export.int8=1", "export.int8 must be true or false, got int 1"),
        ("export.int8=maybe", "export.int8 must be true or false, got str 'maybe'"),
        ("export.int9=true", "unknown key 'export.int9' in export; did you mean 'export.int8'?"),
    ]:
        with pytest.raises(NamPruneError, match=re.escape(message)):
            load_recipe(QUICKSTART, [override])


def test_export_int8_is_refused_where_it_cannot_work(tmp_path, monkeypatch):
    """Before anything trains: torchrun, and compare (it exports nothing)."""
    recipe = load_recipe(QUICKSTART, ["export.int8=true"])
    with pytest.raises(NamPruneError, match=r"^export.int8 is for nam-prune run: compare exports no model"):
        compare(recipe, ["nam"], [0.5], [0], tmp_path / "compare")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(NamPruneError, match=r"^export.int8 runs in one process \(--nproc 1\)"):
        _int8_data(recipe, ClassificationTask)
    assert list(tmp_path.iterdir()) == []


class _ConvThenDecode(torch.nn.Module):
    """Two convolutions, then what a detector does after its last one: float arithmetic on the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.last(torch.relu(self.first(x)))
        return torch.cat([y * 32.0, torch.sigmoid(y)], 1)


def test_the_convolution_free_tail_is_what_follows_the_last_convolutions(tmp_path):
    write_onnx(_ConvThenDecode().eval(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    nodes = {node.name: node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    tail = convolution_free_tail(graph_nodes(tmp_path / "m.onnx"))
    assert sorted(nodes[name] for name in tail if nodes[name] != "Constant") == ["Concat", "Conv", "Mul", "Sigmoid"]
    assert {nodes[name] for name in set(nodes) - set(tail)} == {"Conv", "Relu"}


def test_a_detector_int8_file_keeps_its_stem_and_tail_convolutions_in_float(tmp_path):
    """``convolutions_only``: of five chained convolutions the first two (the stem, which sees the image's
    flat areas) and the last stay float; the two between read int8 weights. ``keep_float`` adds more."""
    chain = torch.nn.Sequential(*[layer for c in range(5) for layer in (torch.nn.Conv2d(1 if c == 0 else 4, 4, 3, padding=1),
                                                                         torch.nn.ReLU())])
    write_onnx(chain.eval(), torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    convolutions = [n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Conv"]
    assert leading_convolutions(graph_nodes(tmp_path / "m.onnx"), 2) == convolutions[:2] and len(convolutions) == 5

    def int8_weights(keep_float=()):
        data = Int8Data((1, 8, 8), lambda _shape: [torch.rand(8, 1, 8, 8)], 8, lambda path: 0.0, 0, convolutions_only=True)
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", data, keep_float)
        graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        return [n.name for n in graph.node if n.op_type == "Conv" and n.input[1] in dequantized]

    assert int8_weights() == convolutions[2:4]
    assert int8_weights([convolutions[3]]) == convolutions[2:3]
    (tmp_path / "m.int8.onnx").unlink()
    with pytest.raises(NamPruneError, match=r"^no node named /nowhere/Conv in the model onnxruntime prepared") as error:
        int8_weights(["/nowhere/Conv"])
    assert "\n" not in str(error.value) and not (tmp_path / "m.int8.onnx").exists()
