"""The detection task: the pipeline's stages with ultralytics' trainer, mAP and GFLOPs.

Besides ``model.pt`` (nam-prune's weights-only checkpoint, read by ``nam-prune report``)
a run writes ``model_ultralytics.pt``, which loads with ``ultralytics.YOLO``.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from nam_prune.artifact import ModelRecord, from_payload, load_state, record_of, state_dict_of
from nam_prune.checkpoint import atomic_write, is_nam_checkpoint, read_checkpoint
from nam_prune.config import from_dict
from nam_prune.console import console
from nam_prune.errors import NamPruneError
from nam_prune.export import ort_latency_ms
from nam_prune.gates import NAMChannelGate
from nam_prune.int8 import CALIBRATION_IMAGES, Int8Data
from nam_prune.measure import gflops, measure
from nam_prune.models import ModelSpec
from nam_prune.prune.graph import IntactBlock, Protected
from nam_prune.recalibrate import recalibrate_bn
from nam_prune.sparsity import gate_scales
from nam_prune.surgery import NAMConfig, insert_nam, resolved
from nam_prune.tasks import Task
from nam_prune.version import __version__
from nam_prune.yolo.config import YoloConfig
from nam_prune.yolo.data import BUILT_IN_NAMES, built_in_data_yaml, class_names, data_yaml_of, user_data_yaml
from nam_prune.yolo.models import (
    YamlMarker,
    attention_stand_ins,
    build_yolo,
    load_ultralytics_checkpoint,
    marked_yaml,
    protected_parts,
    scope_end,
    scope_prefixes,
)
from nam_prune.yolo.train import (
    calibration_batches,
    letterboxed_images,
    split_size,
    train_detector,
    trainer_overrides,
    ultralytics_output,
    validate_detector,
    validate_onnx_detector,
)

DETECTION_COLUMNS = (
    ("params", "params"),
    ("gflops", "GFLOPs"),
    ("map50_95", "mAP50-95"),
    ("latency_ms", "torch ms (CPU, bs 1)"),
    ("torchscript_latency_ms", "TorchScript ms"),
    ("onnx_latency_ms", "onnxruntime ms"),
)


def _parameter_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    """The shapes of ``module``'s own parameters, not its NAM gates' (``prune.strip_gates`` removes those)."""
    gates = {id(p) for m in module.modules() if isinstance(m, NAMChannelGate) for p in m.parameters()}
    return [tuple(p.shape) for p in module.parameters() if id(p) not in gates]


def protection(model: nn.Module, scope: str) -> Protected:
    """The Detect head and attention blocks stay intact; layers outside the scope are never roots."""
    head, blocks = protected_parts(model)
    return Protected(
        layers=[*head, *model.model[scope_end(model, scope):-1]], blocks=blocks, stand_ins=attention_stand_ins()
    )


def intact_report(blocks: list[IntactBlock], before: dict[str, list[tuple[int, ...]]]) -> dict[str, str]:
    """Per protected block: 'intact', or 'intact (input width ...)' when its entry conv lost inputs."""
    states = {}
    for block in blocks:
        shapes = _parameter_shapes(block.module)
        if shapes == before[block.name]:
            states[block.name] = "intact"
        elif [s[:1] + s[2:] for s in shapes] == [s[:1] + s[2:] for s in before[block.name]]:
            states[block.name] = "intact (input width follows the layer feeding it)"
        else:
            raise NamPruneError(f"internal: {block.name} changed inside while pruning; please report this")
    return states


def save_ultralytics(path: Path, model: nn.Module, data_yaml: Path, imgsz: int) -> None:
    """An ultralytics checkpoint of the pruned model (a pickle, as all of theirs are).

    ``YOLO(path)`` loads it (nam-prune must be importable: the model holds its gate and
    split-free modules) and predicts, validates and exports with ultralytics' own code.
    """
    deployed = copy.deepcopy(model).cpu().float().eval()
    deployed.args = {"task": "detect", "data": str(data_yaml), "imgsz": imgsz}
    deployed.yaml = marked_yaml(deployed.yaml)
    deployed.nam_prune_marker = YamlMarker()
    payload = {
        "model": deployed,
        "ema": None,
        "epoch": -1,
        "optimizer": None,
        "train_args": {"task": "detect", "data": str(data_yaml), "imgsz": imgsz, "model": str(path)},
        "date": datetime.now(timezone.utc).isoformat(),
        "version": __version__,
        "nam_prune": True,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


@contextlib.contextmanager
def detect_export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Detect heads return only the decoded boxes and scores (ultralytics' exporter sets the same flag)."""
    previous = {head: head.export for head in model.modules() if type(head).__name__ == "Detect" and hasattr(head, "export")}
    for head in previous:
        head.export = True
    try:
        yield model
    finally:
        for head, export in previous.items():
            head.export = export


class DetectionTask(Task):
    """ultralytics detectors: trained by ``NAMDetectionTrainer``, scored by mAP on a data yaml."""

    columns = DETECTION_COLUMNS
    score_key = "map50_95"
    resumable = False  # ultralytics keeps its own last.pt per stage in <run>/<stage>/weights
    multi_process = False

    def __init__(self, recipe, device: torch.device) -> None:
        super().__init__(recipe, device)
        self.yolo: YoloConfig = recipe.sections["yolo"]
        for section in ("sparsity", "finetune"):
            if getattr(recipe, section).schedule == "multistep":
                raise NamPruneError(
                    f"{section}.schedule: multistep is not available with the ultralytics trainer; use cosine or constant"
                )
        if recipe.nam.spatial:
            raise NamPruneError("nam.spatial is not available for YOLO models (their input size varies); set it to false")
        if recipe.nam.placement != "every_bn":
            raise NamPruneError("YOLO models take nam.placement: every_bn (a gate after every conv-BN-act)")
        self.data_yaml = None if self.yolo.data in BUILT_IN_NAMES else user_data_yaml(self.yolo.data)
        self.names = BUILT_IN_NAMES[self.yolo.data] if self.data_yaml is None else class_names(self.data_yaml)
        self.folder = Path(".")
        self.blocks: list[IntactBlock] = []
        self.block_shapes: dict[str, list[tuple[int, ...]]] = {}
        self.intact: dict[str, str] = {}
        self.check_teachers()

    def prepare(self) -> tuple[nn.Module, ModelRecord]:
        """Build (yaml) or load (trusted ultralytics .pt) the detector, split-free, with NAM gates in scope."""
        if self.recipe.model.weights:
            return self._from_weights(self.recipe.model.weights)
        return self.build(self.recipe.nam)

    def _from_weights(self, weights: str) -> tuple[nn.Module, ModelRecord]:
        """The detector of ``model.weights``: a nam-prune checkpoint (a run's ``dense.pt``, to prune it
        again without retraining) or a state dict for ``model.name``'s yaml."""
        recipe, names = self.recipe, self.names
        payload = read_checkpoint(weights, recipe.model.trust_pickle)
        if not is_nam_checkpoint(payload):
            model, record = self.build(None)
            load_state(model, state_dict_of(payload, f"model.weights {weights}"), weights)
            return self._gated(model, record.spec, recipe.nam)
        record = record_of(payload)
        if record.spec.num_classes != len(names) or not record.spec.name.endswith((".yaml", ".yml", ".pt")):
            raise NamPruneError(
                f"model.weights {weights} holds a {record.spec.name} with {record.spec.num_classes} classes, not a "
                f"YOLO detector for yolo.data's {len(names)} classes; use a checkpoint of a run on that data"
            )
        if record.stripped:
            raise NamPruneError(
                f"model.weights {weights} has no NAM gates left (a run's model.pt); start from its dense.pt"
            )
        model = from_payload(payload, weights).train()
        if record.nam is None:
            model, gated = self._gated(model, record.spec, recipe.nam)
            return model, replace(record, nam=gated.nam, input_shape=gated.input_shape)
        model.names = names
        size = self.yolo.report_imgsz
        return model, replace(record, input_shape=(3, size, size))

    def build(self, gates: NAMConfig | None) -> tuple[nn.Module, ModelRecord]:
        """``model.name``'s detector with ``gates``: a yaml's, randomly initialised, or a trusted
        ultralytics ``.pt``'s trained one (so every compare arm starts from the user's trained model)."""
        name, names = self.recipe.model.name, self.names
        if not name.endswith(".pt"):
            spec = ModelSpec(name=name, num_classes=len(names), in_channels=3)
            return self._gated(build_yolo(spec.name, spec.num_classes, spec.in_channels), spec, gates)
        model = load_ultralytics_checkpoint(name, self.recipe.model.trust_pickle)
        if model.model[-1].nc != len(names):
            raise NamPruneError(f"{name} detects {model.model[-1].nc} classes but yolo.data has {len(names)}; use its own data yaml")
        spec = ModelSpec(name=name, num_classes=len(names), in_channels=3, config=copy.deepcopy(model.yaml))
        return self._gated(model, spec, gates)

    def _gated(self, model: nn.Module, spec: ModelSpec, gates: NAMConfig | None) -> tuple[nn.Module, ModelRecord]:
        if gates is not None:
            gates = resolved(model, replace(gates, include=scope_prefixes(model, self.yolo.scope)))
            insert_nam(model, gates)
        model.names = self.names
        size = self.yolo.report_imgsz
        return model, ModelRecord(spec=spec, input_shape=(3, size, size), nam=gates)

    def load_teacher(self, path: str, section: str) -> nn.Module:
        """A trusted ultralytics ``.pt`` for this data (ultralytics loads it again to distil from it)."""
        if not Path(path).is_file():
            raise NamPruneError(f"{section}.teacher {path} does not exist: name a trained detector's .pt "
                                "(nam-prune train-detector writes DIR/weights/best.pt)")
        teacher = load_ultralytics_checkpoint(path, self.recipe.model.trust_pickle)
        if teacher.model[-1].nc != len(self.names):
            raise NamPruneError(
                f"{section}.teacher {path} detects {teacher.model[-1].nc} classes but yolo.data has {len(self.names)}; "
                "use a detector trained on this data"
            )
        return teacher

    def open(self, folder: Path) -> None:
        self.folder = folder
        if self.data_yaml is None:
            self.data_yaml = built_in_data_yaml(self.yolo.data, folder, self.yolo.imgsz)

    def train(
        self, model, config, stage, on_epoch_end=None, resume=None, penalised=gate_scales, after_backward=None, warm_up=False
    ):
        if after_backward is not None:  # ultralytics' trainer runs the backward pass (exposes_gradients is False)
            raise NamPruneError(f"{stage}: detectors train through ultralytics, which takes no after_backward hook")
        if not config.epochs:  # e.g. a run that starts from a trained dense.pt
            return []
        label = stage.replace(" ", "")  # ultralytics' run sub-folder
        overrides = trainer_overrides(
            config, self.yolo, self.data_yaml, self.device, self.folder, label, self.recipe.seed, warm_up
        )
        console.print(f"{stage}: {config.epochs} epoch(s) with ultralytics (log: {self.log_file})", soft_wrap=True)
        with ultralytics_output(self.log_file):
            log = train_detector(model, overrides, config, penalised)
        summary = ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in log.metrics.items() if "mAP" in k)
        console.print(f"{stage}: done ({summary or 'no validation'})", soft_wrap=True)
        return [asdict(log)]

    @property
    def log_file(self) -> Path:
        return self.folder / "ultralytics.log"

    def measure(self, model, example, stage):
        """Params, MACs and GFLOPs at the report size, CPU latency (torch, onnxruntime) and mAP."""
        config = self.recipe.report
        metrics = measure(model, example, config, deploy_mode=self.deploy_mode).to_dict()
        del metrics["accuracy"]  # detectors are scored by mAP
        return {
            **metrics,
            "gflops": gflops(metrics["macs"]),
            "imgsz": example.shape[-1],
            "onnx_latency_ms": ort_latency_ms(model, example, config.latency_runs, config.warmup, self.deploy_mode),
            **self._validate(model),
        }

    def score(self, model: nn.Module) -> float:
        return self._validate(model)["map50_95"]

    def _validate(self, model: nn.Module) -> dict[str, float]:
        with ultralytics_output(self.log_file):
            return validate_detector(model, self.data_yaml, self.yolo, self.device)

    def recalibrate(self, model: nn.Module) -> int:
        """BN statistics re-estimated over augmented training batches (see ``calibration_batches``)."""
        config = self.recipe.recalibrate
        if not config.batches:  # before the data loader is built
            return 0
        with ultralytics_output(self.log_file):
            return recalibrate_bn(model, calibration_batches(self.data_yaml, self.yolo, self.recipe.seed), config, self.device)

    def protected(self, model: nn.Module) -> Protected:
        protected = protection(model, self.yolo.scope)
        self.blocks = protected.blocks
        self.block_shapes = {b.name: _parameter_shapes(b.module) for b in protected.blocks}
        return protected

    def outputs(self, folder, model, record, stages):
        self.intact = intact = intact_report(self.blocks, self.block_shapes)
        save_ultralytics(folder / "model_ultralytics.pt", model, self.data_yaml, self.yolo.imgsz)
        for block, state in intact.items():
            console.print(f"{block}: {state}", soft_wrap=True)
        console.print(f"saved [bold]{folder / 'model_ultralytics.pt'}[/] (loads with ultralytics.YOLO)", soft_wrap=True)
        return {
            "gflops_reduction": 1 - stages["after"]["gflops"] / stages["before"]["gflops"],
            "protected": intact,
            "data": str(self.data_yaml),
        }

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"names": self.names, "protected": self.intact}

    @classmethod
    def evaluate_checkpoint(cls, model, record, data) -> dict[str, float]:
        if not isinstance(data, Path):
            raise NamPruneError("--data for a YOLO model is an ultralytics data yaml (path, train, val, names)")
        size = record.input_shape[-1]
        return validate_detector(model, data, YoloConfig(data=str(data), imgsz=size), torch.device("cpu"))

    @classmethod
    def stored_data(cls, recipe: dict[str, Any]) -> YoloConfig:
        return from_dict(YoloConfig, recipe.get("yolo") or {}, prefix="yolo.")

    @classmethod
    def int8_data(cls, data: YoloConfig | Path, seed: int = 0) -> Int8Data:
        """Training images letterboxed to the model's input, unaugmented (as the deployed detector sees
        them), and mAP50-95 of an ONNX file on the val split, through ultralytics' validator."""
        if isinstance(data, Path):  # --calibration names an ultralytics data yaml
            data = YoloConfig(data=str(data))
        if not isinstance(data, YoloConfig):
            raise NamPruneError("a detector calibrates on an ultralytics data yaml (path, train, val, names), "
                                "not a classification data set")
        folder = tempfile.TemporaryDirectory(prefix="nam-prune-int8-")
        log = Path(folder.name) / "ultralytics.log"
        with ultralytics_output(log):
            data_yaml = data_yaml_of(data.data, Path(folder.name), data.imgsz)
        count = min(CALIBRATION_IMAGES, split_size(data_yaml, "train", log))

        def score(path: Path) -> float:
            with ultralytics_output(log):
                return validate_onnx_detector(path, data_yaml, data)["map50_95"]

        return Int8Data(
            None, lambda shape: letterboxed_images(data_yaml, "train", shape[-1], count, seed, data.batch, log),
            count, score, split_size(data_yaml, "val", log), folder, convolutions_only=True,
        )

    @staticmethod
    def deploy_mode(model: nn.Module):
        return detect_export_mode(model)
