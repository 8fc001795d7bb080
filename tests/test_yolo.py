"""ultralytics YOLO: split-free conversion, gates, intact head/attention, GFLOPs, checkpoints, ONNX."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

if not os.environ.get("CI"):  # in CI, where the test extra installs it, a missing ultralytics must fail
    pytest.importorskip("ultralytics")

from conftest import ROOT, cli, cli_process
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

from nam_prune.artifact import ModelRecord, load, save
from nam_prune.errors import NamPruneError
from nam_prune.export import export_torchscript, ort_session, write_onnx
from nam_prune.fashion_detect import FashionDetectConfig, make_fashion_detect
from nam_prune.gates import NAMGated, channel_gates
from nam_prune.models import ModelSpec
from nam_prune.prune import PruneConfig, count_macs_params, prune_model
from nam_prune.recipe import load_recipe
from nam_prune.surgery import NAMConfig, insert_nam
from nam_prune.train import TrainConfig
from nam_prune.yolo.config import YoloConfig
from nam_prune.yolo.data import DEMO_NAMES, build_demo_set, ultralytics_assets
from nam_prune.yolo.models import C2fSplitFree, build_yolo, make_split_free, scope_prefixes
from nam_prune.yolo.task import DetectionTask, detect_export_mode, protection, save_ultralytics
from nam_prune.yolo.train import NAMDetectionTrainer, OnnxDetector, detector_sparsity, trainer_overrides

SIZE = 128


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), detect_export_mode(model.eval()):
        return model(x)


def _gated(name: str, scope: str = "backbone") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_yolo(name, 3, 3)
    insert_nam(model, NAMConfig(include=scope_prefixes(model, scope)))
    for _, gate in channel_gates(model):  # distinct gammas, as after sparsity training
        gate.bn.weight.data.uniform_(0.05, 1.0)
    return model


@pytest.mark.parametrize("name", ["yolov8n.yaml", pytest.param("yolo11n.yaml", marks=pytest.mark.slow)])
def test_split_free_conversion_keeps_outputs(name: str) -> None:
    torch.manual_seed(0)
    original = DetectionModel(name, nc=3, verbose=False)
    for module in original.modules():  # non-trivial BN statistics so a wrong slice would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    converted = copy.deepcopy(original)
    assert make_split_free(converted) == 8
    assert not any(type(m).__name__ in {"C2f", "C3k2"} for m in converted.modules())
    assert sum(isinstance(m, C2fSplitFree) for m in converted.modules()) == 8
    x = torch.rand(2, 3, SIZE, SIZE)
    assert (_outputs(original, x) - _outputs(converted, x)).abs().max().item() <= 1e-5
    original.train()
    converted.train()
    raw_a, raw_b = original(x), converted(x)
    assert max((raw_a[k] - raw_b[k]).abs().max().item() for k in ("boxes", "scores")) <= 1e-5


def test_gates_sit_after_the_activation_and_survive_fusing() -> None:
    model = _gated("yolov8n.yaml")
    backbone = len(model.yaml["backbone"])
    gated_layers = {n.split(".")[1] for n, m in model.named_modules() if isinstance(m, NAMGated)}
    assert gated_layers == {str(i) for i in range(backbone)}  # backbone only, never neck or Detect
    x = torch.rand(1, 3, SIZE, SIZE)
    expected = _outputs(model, x)
    fused = copy.deepcopy(model).fuse(verbose=False)  # what ultralytics does before predicting
    assert (_outputs(fused, x) - expected).abs().max().item() <= 1e-3


@pytest.mark.parametrize(
    "name,keep,size",
    [("yolov8n.yaml", 0.6, 64),  # the smallest size whose P5 map is still 2x2
     pytest.param("yolov8n.yaml", 0.6, SIZE, marks=pytest.mark.slow),
     pytest.param("yolo11n.yaml", 0.7, SIZE, marks=pytest.mark.slow)],
)
def test_prune_meets_the_gflops_target_and_leaves_head_and_attention_intact(name: str, keep: float, size: int) -> None:
    model = _gated(name, "backbone")
    example = torch.zeros(1, 3, size, size)
    macs_before, params_before = count_macs_params(model, example)
    protected = protection(model, "backbone")
    shapes = {b.name: [tuple(p.shape) for p in b.module.parameters()] for b in protected.blocks}
    neck = {n: tuple(p.shape) for n, p in model.named_parameters() if int(n.split(".")[1]) >= len(model.yaml["backbone"])}
    prune_model(model, example, PruneConfig(macs_keep=keep, max_pruning_ratio=0.9, round_to=1), protected=protected)
    macs_after, params_after = count_macs_params(model, example)
    assert keep - 0.03 <= macs_after / macs_before <= keep
    assert params_after < params_before
    blocks = {b.name: b for b in protected.blocks}
    assert [tuple(p.shape) for p in blocks["detect head"].module.parameters()] == shapes["detect head"]
    if name == "yolo11n.yaml":
        psa = next(b for b in protected.blocks if "C2PSA" in b.name)
        after = [tuple(p.shape) for p in psa.module.parameters()]
        assert [s[:1] + s[2:] for s in after] == [s[:1] + s[2:] for s in shapes[psa.name]]  # only cv1's inputs
    # backbone scope: the neck's own widths stay; only inputs fed by the backbone shrink
    for n, p in model.named_parameters():
        if n in neck:
            assert p.shape[0] == neck[n][0], n
    anchors = (size // 8) ** 2 + (size // 16) ** 2 + (size // 32) ** 2
    assert _outputs(model, torch.rand(1, 3, size, size)).shape == (1, 4 + 3, anchors)


@pytest.mark.parametrize(
    "name,size", [("yolov8n.yaml", 64), pytest.param("yolo11n.yaml", SIZE, marks=pytest.mark.slow)]
)
def test_pruned_detector_reloads_from_weights_only_checkpoint(tmp_path: Path, name: str, size: int) -> None:
    model = _gated(name, "backbone+neck")
    example = torch.zeros(1, 3, size, size)
    result = prune_model(model, example, PruneConfig(macs_keep=0.5), protected=protection(model, "backbone+neck"))
    nam = NAMConfig(include=scope_prefixes(model, "backbone+neck"))
    record = ModelRecord(ModelSpec(name, 3, 3), (3, size, size), nam, result.history)
    save(tmp_path / "model.pt", model, record)
    reloaded = load(tmp_path / "model.pt")
    x = torch.rand(1, 3, size, size)
    assert torch.equal(_outputs(model, x), _outputs(reloaded, x))
    assert count_macs_params(reloaded, example)[0] == count_macs_params(model, example)[0]


def test_model_weights_starts_a_detector_run_from_a_saved_nam_model(tmp_path: Path) -> None:
    """A run's dense.pt can be pruned again without retraining; a classifier checkpoint is refused."""
    classes = len(DEMO_NAMES)  # the recipe's demo set
    model = build_yolo("yolov8n.yaml", classes, 3)
    nam = NAMConfig(include=scope_prefixes(model, "backbone+neck"))
    insert_nam(model, nam)
    record = ModelRecord(ModelSpec("yolov8n.yaml", classes, 3), (3, SIZE, SIZE), nam)
    save(tmp_path / "dense.pt", model, record)
    recipe = load_recipe(ROOT / "recipes/yolov8n_backbone_neck.yaml", [f"model.weights={tmp_path / 'dense.pt'}"])
    loaded, loaded_record = DetectionTask(recipe, torch.device("cpu")).prepare()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert loaded_record.nam == record.nam and loaded_record.input_shape == (3, 640, 640)

    save(tmp_path / "stripped.pt", model, replace(record, stripped=True))  # a run's model.pt: no gates to rank by
    recipe = load_recipe(ROOT / "recipes/yolov8n_backbone_neck.yaml", [f"model.weights={tmp_path / 'stripped.pt'}"])
    with pytest.raises(NamPruneError, match="start from its dense.pt"):
        DetectionTask(recipe, torch.device("cpu")).prepare()

    save(tmp_path / "classifier.pt", torch.nn.Conv2d(1, 2, 1), ModelRecord(ModelSpec("resnet20", 2, 1), (1, 28, 28)))
    recipe = load_recipe(ROOT / "recipes/yolov8n_backbone_neck.yaml", [f"model.weights={tmp_path / 'classifier.pt'}"])
    with pytest.raises(NamPruneError, match="not a YOLO detector"):
        DetectionTask(recipe, torch.device("cpu")).prepare()


@pytest.fixture(scope="module")
def demo_yaml(tmp_path_factory) -> Path:
    return build_demo_set(tmp_path_factory.mktemp("demo"))


def test_demo_set_labels_are_valid_yolo_boxes(demo_yaml: Path) -> None:
    labels = sorted((demo_yaml.parent / "labels").glob("*.txt"))
    assert [p.stem for p in labels] == ["bus", "zidane"]
    rows = np.array([[float(v) for v in line.split()] for p in labels for line in p.read_text().splitlines()])
    assert rows.shape == (8, 5)
    assert set(rows[:, 0].astype(int)) == {0, 1, 2}
    assert (rows[:, 1:] > 0).all() and (rows[:, 1:] <= 1).all()


@pytest.mark.slow
def test_ultralytics_checkpoint_loads_predicts_and_exports_onnx(tmp_path: Path, demo_yaml: Path) -> None:
    model = _gated("yolov8n.yaml", "backbone+neck")
    example = torch.zeros(1, 3, SIZE, SIZE)
    macs, _ = count_macs_params(model, example)
    prune_model(model, example, PruneConfig(macs_keep=0.55), protected=protection(model, "backbone+neck"))
    model.names = {0: "person", 1: "bus", 2: "tie"}
    path = tmp_path / "model_ultralytics.pt"
    save_ultralytics(path, model, demo_yaml, SIZE)

    yolo = YOLO(str(path))
    assert yolo.task == "detect"
    assert sum(p.numel() for p in yolo.model.parameters()) == sum(p.numel() for p in model.parameters())
    result = yolo.predict(ultralytics_assets() / "bus.jpg", imgsz=SIZE, conf=0.0, verbose=False)[0]
    assert result.orig_shape == (1080, 810) and len(result.boxes) > 0

    with pytest.raises(NamPruneError, match="trainer=nam_prune.yolo.NAMDetectionTrainer"):
        YOLO(str(path)).train(data=str(demo_yaml), epochs=1, imgsz=64, device="cpu", workers=0)

    onnx_path = Path(YOLO(str(path)).export(format="onnx", imgsz=SIZE, simplify=False))
    session = ort_session(onnx_path)
    x = torch.rand(1, 3, SIZE, SIZE)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = _outputs(YOLO(str(path)).model, x).numpy()
    assert got.shape == expected.shape
    assert np.abs(got[:, 4:] - expected[:, 4:]).max() <= 1e-4  # class scores
    assert np.abs(got[:, :4] - expected[:, :4]).max() / SIZE <= 1e-4  # boxes, in image-size units


def test_user_checkpoint_needs_the_trust_flag(tmp_path: Path, demo_yaml: Path) -> None:
    path = tmp_path / "user.pt"
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    torch.save({"model": model}, path)
    recipe = load_recipe(ROOT / "recipes/yolov8n_backbone_neck.yaml", [f"model.name={path}", f"yolo.data={demo_yaml}"])
    cpu = torch.device("cpu")
    with pytest.raises(NamPruneError, match="trust_pickle"):
        DetectionTask(recipe, cpu).prepare()
    recipe.model.trust_pickle = True
    loaded, record = DetectionTask(recipe, cpu).prepare()
    assert record.spec.config["backbone"] == model.yaml["backbone"]
    assert all(p.requires_grad for n, p in loaded.named_parameters() if ".dfl." not in n)
    fused = DetectionModel("yolov8n.yaml", nc=3, verbose=False).fuse(verbose=False)
    torch.save({"model": fused}, path)
    with pytest.raises(NamPruneError, match="fused"):
        DetectionTask(recipe, cpu).prepare()


@pytest.mark.slow
def test_yolov8n_recipe_end_to_end_then_ultralytics_trains_further(tmp_path: Path) -> None:
    tiny = ["yolo.imgsz=64", "yolo.report_imgsz=128", "report.latency_runs=2", "report.warmup=1",
            "sparsity.epochs=1", "finetune.epochs=1", f"output={tmp_path / 'run'}"]
    done = cli_process("run", str(ROOT / "recipes/yolov8n_backbone_neck.yaml"), *tiny, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["gflops_reduction"] >= 0.40
    assert results["after"]["params"] < results["before"]["params"]
    assert results["protected"]["detect head"].startswith("intact")
    console = done.stdout + done.stderr  # ultralytics' argument dump and epoch lines go to the log file
    assert "engine/trainer" not in console and "sparsity: done" in console
    assert "engine/trainer" in (tmp_path / "run/ultralytics.log").read_text()
    report = cli_process("report", str(tmp_path / "run/model.pt"), "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert json.loads(report.stdout)["macs"] == results["after"]["macs"]

    yolo = YOLO(str(tmp_path / "run/model_ultralytics.pt"))
    params = sum(p.numel() for p in yolo.model.parameters())
    yolo.train(data=results["data"], epochs=1, imgsz=64, batch=2, workers=0, device="cpu", plots=False,
               project=str(tmp_path), name="further", trainer=NAMDetectionTrainer)
    assert sum(p.numel() for p in yolo.model.parameters()) == params  # still the pruned model
    assert (tmp_path / "further/weights/last.pt").is_file()


def test_yolo_recipe_errors_are_one_line(tmp_path: Path) -> None:
    cases = {
        ("yolo.data=/nowhere/data.yaml",): "yolo.data",
        ("model.name=yolov8q.yaml",): "no model yaml",
        ("nam.spatial=true",): "nam.spatial",
        ("yolo.scope=neck",): "yolo.scope",
        ("finetune.schedule=multistep",): "finetune.schedule: multistep is not available",  # a recipe key, not 'step1'
        ("finetune.teacher=/nowhere/best.pt",): "finetune.teacher /nowhere/best.pt does not exist",
    }
    for overrides, message in cases.items():
        done = cli("run", str(ROOT / "recipes/yolov8n_backbone_neck.yaml"), *overrides, f"output={tmp_path / 'r'}", cwd=tmp_path)
        assert done.returncode == 2, (overrides, done.stderr[-1000:])
        assert message in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_finetuning_distils_from_a_trained_detector(tmp_path: Path) -> None:
    """finetune.teacher hands a trusted ultralytics .pt to ultralytics' own distillation: its loss is
    logged, and the model handed back is the pruned student alone."""
    data = make_fashion_detect(tmp_path / "set", FashionDetectConfig(images=20, imgsz=64))
    teacher = DetectionModel("yolov8n.yaml", nc=len(yaml.safe_load(data.read_text())["names"]), verbose=False)
    torch.save({"model": teacher}, tmp_path / "teacher.pt")  # as a user's trained best.pt holds it
    overrides = ["yolo.imgsz=64", "yolo.report_imgsz=64", "yolo.batch=8", "report.latency_runs=1", "report.warmup=0",
                 "sparsity.epochs=1", "finetune.epochs=1", "report.baseline=false", "recalibrate.batches=2",
                 f"yolo.data={data}", "model.trust_pickle=true", f"finetune.teacher={tmp_path / 'teacher.pt'}",
                 f"output={tmp_path / 'run'}"]
    done = cli("run", str(ROOT / "recipes/yolov8n_fashion_detect.yaml"), *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "run/results.json").read_text())
    for stage, distilled in (("sparsity", False), ("finetune", True)):  # ultralytics' per-epoch log of each stage
        columns = (tmp_path / "run" / stage / "results.csv").read_text().splitlines()[0].split(",")
        assert ("train/dis_loss" in [c.strip() for c in columns]) == distilled, columns
    assert results["after"]["gflops"] <= 0.56 * results["before"]["gflops"]
    report = cli("report", str(tmp_path / "run/model.pt"), "--json", cwd=tmp_path)
    assert json.loads(report.stdout)["params"] == results["after"]["params"]  # no teacher or projector inside


@pytest.mark.parametrize("images", [20, pytest.param("all", marks=pytest.mark.slow)])
def test_recipe_on_the_derived_set_trains_prunes_and_recalibrates(tmp_path: Path, images: int | str) -> None:
    """yolo.data: fashion-detect writes the set (2,000 canvases) into the run folder and every stage is
    scored by mAP; the fast variant gives it a 20-canvas set made beforehand, as a user's own data."""
    tiny = ["yolo.imgsz=64", "yolo.report_imgsz=64", "yolo.batch=8", "report.latency_runs=1", "report.warmup=0",
            "sparsity.epochs=1", "finetune.epochs=1", "report.baseline=false", "recalibrate.batches=2",
            f"output={tmp_path / 'run'}"]
    if images != "all":
        tiny.append(f"yolo.data={make_fashion_detect(tmp_path / 'set', FashionDetectConfig(images=images, imgsz=64))}")
    done = cli("run", str(ROOT / "recipes/yolov8n_fashion_detect.yaml"), *tiny, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert (tmp_path / "run/fashion_detect_data/data.yaml").is_file() == (images == "all")
    assert results["after"]["gflops"] <= 0.56 * results["before"]["gflops"]
    assert {"map50_95", "map50"} <= set(results["recalibrated"])


@pytest.mark.slow
def test_compare_works_for_detectors_at_matched_gflops(tmp_path: Path) -> None:
    """NAM against BN-slimming on a detector: every arm at the same GFLOPs, scored by mAP50-95."""
    tiny = ["yolo.imgsz=64", "yolo.report_imgsz=64", "report.latency_runs=1", "report.warmup=0",
            "sparsity.epochs=1", "finetune.epochs=1", "recalibrate.batches=1"]
    done = cli("compare", str(ROOT / "recipes/yolov8n_backbone_neck.yaml"), *tiny, "--criteria", "nam,bn_slimming",
              "--macs-keep", "0.6", "--seeds", "0", "-o", str(tmp_path / "cmp"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert state["score_key"] == "map50_95" and len(state["arms"]) == 2
    for arm in state["arms"]:
        assert abs(arm["macs_kept"] - 0.6) <= 0.02
        assert {"map50_95_trained", "map50_95_pruned", "map50_95_recalibrated", "map50_95"} <= set(arm)
    nam, slimming = sorted(state["arms"], key=lambda a: a["criterion"] != "nam")
    assert nam["params"] != slimming["params"]  # the two rankings cut different channels
    assert (tmp_path / "cmp/accuracy_vs_macs.png").is_file()


def test_torchscript_export_of_a_detector_leaves_the_eager_model_alone(tmp_path: Path) -> None:
    """The frozen detector matches eager torch in its deployed form, and the eager model is unchanged."""
    model = _gated("yolov8n.yaml").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), detect_export_mode(model):
        before = model(x)
    result = export_torchscript(model, torch.zeros(1, 3, 64, 64), tmp_path / "m.torchscript", detect_export_mode)
    assert result.max_abs_diff <= 1e-4
    with torch.no_grad(), detect_export_mode(model):
        assert torch.equal(model(x), before)


def test_export_mode_restores_what_the_head_had() -> None:
    """Nested (an export inside a caller's own export mode) the inner exit must not switch the head back."""
    model = build_yolo("yolov8n.yaml", 3, 3)
    head = next(m for m in model.modules() if type(m).__name__ == "Detect")
    with detect_export_mode(model):
        with detect_export_mode(model):
            pass
        assert head.export is True
    assert head.export is False


def test_an_onnx_detector_runs_any_batch_on_a_file_of_batch_one(tmp_path: Path) -> None:
    """What ultralytics' validator sees of an exported file: the deployed model's outputs, batch for batch."""
    model = _gated("yolov8n.yaml").eval()
    write_onnx(model, torch.zeros(1, 3, 64, 64), tmp_path / "m.onnx", deploy_mode=detect_export_mode)
    detector = OnnxDetector(tmp_path / "m.onnx", DEMO_NAMES)
    x = torch.rand(3, 3, 64, 64)
    assert detector.batch == 1 and copy.deepcopy(detector) is detector
    torch.testing.assert_close(detector(x), _outputs(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_export_int8_of_a_pruned_detector_scores_both_files_by_map(tmp_path: Path, demo_yaml: Path) -> None:
    """--int8 on a detector: calibrated on letterboxed training images, both files scored by mAP50-95
    through ultralytics' validator, the same mAP as the torch model for the FP32 file."""
    from nam_prune.yolo.config import YoloConfig
    from nam_prune.yolo.train import validate_detector, validate_onnx_detector

    model = _gated("yolov8n.yaml", "backbone+neck")
    example = torch.zeros(1, 3, 64, 64)
    result = prune_model(model, example, PruneConfig(macs_keep=0.6), protected=protection(model, "backbone+neck"))
    nam = NAMConfig(include=scope_prefixes(model, "backbone+neck"))
    record = ModelRecord(ModelSpec("yolov8n.yaml", 3, 3), (3, 64, 64), nam, result.history)
    save(tmp_path / "model.pt", model, record)
    out = cli("export", str(tmp_path / "model.pt"), "--int8", "--calibration", str(demo_yaml))
    assert out.returncode == 0, out.stderr
    assert "calibrated on 2 training images" in out.stderr
    assert re.search(r"mAP50-95 on 2 test images: FP32 ONNX \d+\.\d\d%, INT8 \d+\.\d\d%", out.stderr)
    int8 = onnx.load(str(tmp_path / "model.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)
    other_classes = tmp_path / "other.yaml"
    other_classes.write_text(yaml.safe_dump({**yaml.safe_load(demo_yaml.read_text()), "names": {0: "a", 1: "b"}}))
    wrong = cli("export", str(tmp_path / "model.pt"), "--int8", "--calibration", str(other_classes), "-o", str(tmp_path / "w.onnx"))
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1] == (
        f"error: the model detects 3 classes but {other_classes} names 2: calibrate and score on the data it was trained on")
    assert not list(tmp_path.glob("w*.onnx"))
    config = YoloConfig(data=str(demo_yaml), imgsz=64, batch=2)
    onnx_map = validate_onnx_detector(tmp_path / "model.onnx", demo_yaml, config)
    assert onnx_map == pytest.approx(validate_detector(load(tmp_path / "model.pt"), demo_yaml, config, torch.device("cpu")), abs=1e-3)


def test_export_int8_in_a_detector_recipe_reads_its_yolo_data(demo_yaml: Path) -> None:
    """A detector recipe with export.int8 calibrates on its yolo.data (letterboxed) and scores the val split."""
    from nam_prune.pipeline import _int8_data

    recipe = load_recipe(ROOT / "recipes" / "yolov8n_fashion_detect.yaml", ["export.int8=true", f"yolo.data={demo_yaml}"])
    data = _int8_data(recipe, DetectionTask)
    assert (data.input_shape, data.calibration_images, data.test_images) == (None, 2, 2)
    assert [tuple(batch.shape) for batch in data.calibration((3, 96, 96))] == [(2, 3, 96, 96)]


def test_plateau_gain_compares_the_means_of_the_last_two_windows() -> None:
    from nam_prune.yolo.baseline import plateau_gain

    assert plateau_gain([10.0, 20.0, 30.0], 2) is None  # too short to tell
    assert plateau_gain([10.0, 40.0, 40.2, 39.0], 2) == pytest.approx(14.6)
    # one lucky peak early on does not stop a curve whose mean still rises (a rule on the best would)
    assert plateau_gain([30.0, 60.0, 40.0, 50.0, 55.0, 50.0], 3) == pytest.approx(25 / 3)
    assert plateau_gain([50.0, 56.0, 52.0, 54.0, 51.0, 53.0], 3) == pytest.approx(0.0)


def test_annealing_takes_the_learning_rate_from_where_it_is_to_its_floor() -> None:
    from ultralytics.utils.torch_utils import one_cycle

    from nam_prune.yolo.baseline import annealed

    cosine = one_cycle(1, 0.01, 100)
    factor = annealed(cosine, start=60, epochs=10, floor=0.01)
    assert [factor(e) for e in (0, 30, 60)] == [cosine(e) for e in (0, 30, 60)]
    steps = [factor(e) for e in range(60, 75)]
    assert all(a > b for a, b in zip(steps[:11], steps[1:11]))  # falls every epoch of the ten
    assert steps[10] == pytest.approx(0.01) and steps[14] == pytest.approx(0.01)  # and stays at the floor


def test_train_detector_errors_are_one_line_and_write_nothing(tmp_path: Path, demo_yaml: Path) -> None:
    cases = {
        ("yolov8n.pt", "--out", str(tmp_path / "a")): "builds a model from its ultralytics yaml",
        ("yolov8n.yaml", "--out", str(tmp_path / "b"), "--data", str(tmp_path / "none.yaml")): "not found",
        ("yolov8n.yaml", "--out", str(tmp_path / "c"), "--epochs", "0"): "--epochs",
        ("yolov8q.yaml", "--out", str(tmp_path / "e"), "--data", str(demo_yaml)): "no model yaml",
    }
    for args, message in cases.items():
        done = cli("train-detector", *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout[-1000:])
        assert message in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "d/weights").mkdir(parents=True)
    (tmp_path / "d/weights/best.pt").write_bytes(b"trained")
    done = cli("train-detector", "yolov8n.yaml", "--out", str(tmp_path / "d"), "--data", str(demo_yaml), cwd=tmp_path)
    assert done.returncode == 2 and "already holds a trained detector" in done.stdout + done.stderr
    assert (tmp_path / "d/weights/best.pt").read_bytes() == b"trained"


def test_train_detector_anneals_after_a_plateau_and_its_best_pt_starts_a_recipe(tmp_path: Path, demo_yaml: Path) -> None:
    out = tmp_path / "trained"
    done = cli("train-detector", "yolov8n.yaml", "--out", str(out), "--data", str(demo_yaml), "--epochs", "16",
               "--min-epochs", "2", "--plateau", "1", "--min-gain", "1000", "--anneal", "12", "--imgsz", "64", "--batch", "2",
               cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["plateaued"] and summary["anneal_from"] == 2  # the first epoch the rule can read
    assert summary["epochs_run"] == len(summary["map50_95"]) == 14  # 12 annealing epochs, not the cap of 16
    rates = [float(row.split(",")[-1]) for row in (out / "results.csv").read_text().splitlines()[1:]]
    assert rates[-1] == pytest.approx(0.001 * 0.01)  # lr0 * lrf: the schedule's floor at the last epoch
    log = (out / "ultralytics.log").read_text()  # mosaic off from the first annealing epoch (ultralytics' own: last 10)
    assert log.index(" 2/16 ") < log.index("Closing dataloader mosaic") < log.index(" 3/14 ")  # the cap was 16 until it fired
    assert summary["command"].startswith("nam-prune train-detector yolov8n.yaml --out")
    recipe = load_recipe(ROOT / "recipes/yolov8n_backbone_neck.yaml",
                         [f"model.name={summary['best_pt']}", "model.trust_pickle=true", f"yolo.data={demo_yaml}"])
    model, record = DetectionTask(recipe, torch.device("cpu")).prepare()
    assert record.spec.config["backbone"][0][2] == "Conv" and len(channel_gates(model)) > 0


def test_stripping_the_gates_inside_an_intact_attention_block_keeps_it_intact() -> None:
    from nam_prune.surgery import strip_gates
    from nam_prune.yolo.task import _parameter_shapes, intact_report

    model = _gated("yolo11n.yaml", "backbone+neck")
    blocks = protection(model, "backbone+neck").blocks
    assert any(isinstance(m, NAMGated) for b in blocks for m in b.module.modules())  # C2PSA's own convs carry gates
    before = {b.name: _parameter_shapes(b.module) for b in blocks}
    strip_gates(model)
    assert set(intact_report(blocks, before).values()) == {"intact"}


def test_a_detector_recipe_names_its_yolo_data_for_calibration() -> None:
    """--data / --calibration with a detector's recipe reads its yolo: section (it read the classifiers'
    data: default, which the detector then refused as 'a classification data set')."""
    from nam_prune.cli import parse_data_option
    from nam_prune.data import DataConfig
    from nam_prune.yolo.config import YoloConfig

    data = parse_data_option(str(ROOT / "recipes/yolov8n_fashion_detect_trained.yaml"))
    assert isinstance(data, YoloConfig) and (data.data, data.imgsz) == ("fashion-detect", 160)
    assert isinstance(parse_data_option(str(ROOT / "recipes/fashion_quickstart.yaml")), DataConfig)  # no yolo: section


def test_ultralytics_training_opens_the_gates_batch_by_batch_in_the_model_and_its_ema() -> None:
    """finetune.open_gates through ultralytics' callbacks: the trained model and the EMA copy it validates
    and keeps get the same opening before each batch, 0 at the first and 1 at the last of its epochs."""
    from types import SimpleNamespace

    from nam_prune.yolo.train import _open_gates_while_training

    model = build_yolo("yolov8n.yaml", 2, 3)
    insert_nam(model, NAMConfig(include=scope_prefixes(model, "backbone+neck")))
    callbacks: dict[str, list] = {}
    trainer = SimpleNamespace(
        model=model, ema=SimpleNamespace(ema=copy.deepcopy(model)), train_loader=[None] * 3, epoch=0,
        add_callback=lambda event, fn: callbacks.setdefault(event, []).append(fn),
    )
    _open_gates_while_training(trainer, TrainConfig(epochs=3, open_gates=2))
    seen = []
    for epoch in range(3):
        trainer.epoch = epoch
        for fn in callbacks["on_train_epoch_start"]:
            fn(trainer)
        for _ in trainer.train_loader:
            for fn in callbacks["on_train_batch_start"]:
                fn(trainer)
            openings = {m.opening for copy_ in (trainer.model, trainer.ema.ema) for m in copy_.modules() if isinstance(m, NAMGated)}
            assert len(openings) == 1
            seen.append(openings.pop())
    assert seen == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1])


def test_trainer_overrides_warm_up_only_the_first_stage_and_pass_close_mosaic(tmp_path):
    """The yolo section reaches ultralytics: warm-up only where the stage trains the model as built
    (a trained model needs none), ``close_mosaic`` in every stage."""
    yolo = YoloConfig(warmup_epochs=2.0, close_mosaic=20)
    config = TrainConfig(epochs=20, optimizer="adamw", lr=5e-4)
    overrides = [
        trainer_overrides(config, yolo, tmp_path / "data.yaml", torch.device("cpu"), tmp_path, label, 0, warm_up)
        for label, warm_up in (("namseed0", True), ("finetune", False))
    ]
    assert [(o["warmup_epochs"], o["close_mosaic"], o["optimizer"], o["lr0"]) for o in overrides] == [
        (2.0, 20, "AdamW", 5e-4), (0.0, 20, "AdamW", 5e-4),
    ]


def test_auto_regularizer_is_polarization_on_detectors():
    """Every detector figure was measured with polarization; an explicit choice is kept."""
    assert detector_sparsity(TrainConfig(penalty=0.16)).regularizer == "polarization"
    assert detector_sparsity(TrainConfig(penalty=0.16, regularizer="l1")).regularizer == "l1"
