"""What differs between model families inside the one stage sequence (``nam_prune.pipeline``).

A :class:`Task` builds the model, trains it, scores it, says what must not be pruned and
writes any extra outputs. Image classification is built in; a family that does something
else (nam-prune's YOLO detectors) names its own ``Task`` subclass in its ``ModelFamily``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from nam_prune.artifact import ModelRecord, from_payload, load_state, record_of, state_dict_of
from nam_prune.checkpoint import is_nam_checkpoint, read_checkpoint
from nam_prune.config import from_dict
from nam_prune.data import DataConfig, load_data, random_subset
from nam_prune.errors import NamPruneError
from nam_prune.export import ort_session
from nam_prune.int8 import CALIBRATION_IMAGES, Int8Data, ort_top1
from nam_prune.measure import measure
from nam_prune.models import ModelSpec, build_model, build_pretrained, check_input, family_for
from nam_prune.prune.graph import Protected
from nam_prune.recalibrate import recalibrate_bn
from nam_prune.sparsity import Scales, gate_scales
from nam_prune.surgery import NAMConfig, insert_nam, require_batchnorm, resolved
from nam_prune.train import AfterBackward, TrainConfig, TrainState, accumulate_gradients, evaluate, fit

if TYPE_CHECKING:
    from nam_prune.recipe import Recipe

Columns = tuple[tuple[str, str], ...]

CLASSIFICATION_COLUMNS: Columns = (
    ("params", "params"),
    ("macs", "MACs"),
    ("accuracy", "top-1"),
    ("latency_ms", "torch ms (CPU, bs 1)"),
    ("torchscript_latency_ms", "TorchScript ms"),
)


class Task:
    """The family-specific half of a run; ``pipeline.run`` is the other half.

    ``resumable``: checkpoints every epoch and takes ``--resume``. ``multi_process``: runs
    under torchrun. ``columns``: (metric key, header) pairs of the summary table;
    ``score_key``: the metric that says how good a model is (a fraction 0-1).
    ``exposes_gradients``: ``train`` calls an ``after_backward`` hook and
    ``accumulate_gradients`` gives the task loss's gradients (what ``compare``'s ``group_sl``
    and ``taylor`` need).
    """

    columns: Columns = CLASSIFICATION_COLUMNS
    score_key = "accuracy"
    resumable = True
    multi_process = True
    exposes_gradients = False

    def __init__(self, recipe: "Recipe", device: torch.device) -> None:
        self.recipe, self.device = recipe, device

    @classmethod
    def score_label(cls) -> str:
        """How reports name the score: the header of ``score_key``'s column."""
        return dict(cls.columns)[cls.score_key]

    def prepare(self) -> tuple[nn.Module, ModelRecord]:
        """Build or load the model with its NAM gates (before the run folder exists)."""
        raise NotImplementedError

    def open(self, folder: Path) -> None:
        """The run folder exists (a task may write its data there)."""

    def build(self, gates: NAMConfig | None) -> tuple[nn.Module, ModelRecord]:
        """The recipe's model, randomly initialised, with ``gates`` (or none): each arm of ``compare``."""
        raise NotImplementedError

    def train(
        self,
        model: nn.Module,
        config: TrainConfig,
        stage: str,
        on_epoch_end: Callable[[TrainState], None] | None = None,
        resume: TrainState | None = None,
        penalised: Scales = gate_scales,
        after_backward: AfterBackward | None = None,
        warm_up: bool = False,
    ) -> list[dict[str, Any]]:
        """Train in place for ``config.epochs`` with ``config.penalty`` on the ``penalised`` scales
        (and ``after_backward`` after each backward pass, where ``exposes_gradients``); returns one
        log entry per epoch (or stage). ``warm_up``: the stage trains the model as built (``run``'s
        sparsity stage, ``compare``'s first), where a task with a learning-rate warm-up
        (``yolo.warmup_epochs``) applies it; stages after a cut start from a trained model."""
        raise NotImplementedError

    def load_teacher(self, path: str, section: str) -> nn.Module:
        """``section.teacher``, checked to fit this task's model and data (see :class:`TrainConfig`)."""
        raise NamPruneError(f"{section}.teacher: {type(self).__name__} has no knowledge distillation; remove the key")

    def check_teachers(self) -> None:
        """Every stage's teacher loads and fits: a one-line error before training, not after sparsity."""
        for section in ("sparsity", "finetune"):
            path = getattr(self.recipe, section).teacher
            if path:
                self.load_teacher(path, section)

    def accumulate_gradients(self, model: nn.Module, batches: int) -> int:
        """The task loss's mean gradient over ``batches`` training batches in ``.grad`` (where
        ``exposes_gradients``); returns the batches used."""
        raise NamPruneError(f"{type(self).__name__} does not expose the task loss's gradients")

    def score(self, model: nn.Module) -> float:
        """The task's score (``score_key``) of ``model`` on the test / val split."""
        raise NotImplementedError

    def reseed(self, seed: int) -> None:
        """Start the next training from ``seed``: the same images in the same order for every arm."""
        torch.manual_seed(seed)
        self.recipe = replace(self.recipe, seed=seed)

    def measure(self, model: nn.Module, example: torch.Tensor, stage: str) -> dict[str, Any]:
        """The metrics of one stage (params, MACs, latency and the task's score)."""
        raise NotImplementedError

    def protected(self, model: nn.Module) -> Protected:
        """What pruning must leave alone in this model."""
        return Protected()

    def recalibrate(self, model: nn.Module) -> int:
        """Re-estimate BN running statistics on training data; returns the batches used."""
        return 0

    def rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def restore_rng(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])

    def outputs(
        self, folder: Path, model: nn.Module, record: ModelRecord, stages: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Write extra files for the final model; returns extra entries for ``results.json``."""
        return {}

    def checkpoint_fields(self) -> dict[str, Any]:
        """Extra plain values stored in ``model.pt``."""
        return {}

    @classmethod
    def evaluate_checkpoint(cls, model: nn.Module, record: ModelRecord, data: Any) -> dict[str, float]:
        """Scores of a saved model on ``data`` (what ``report --data`` hands over)."""
        raise NotImplementedError

    @classmethod
    def stored_data(cls, recipe: dict[str, Any]) -> Any:
        """The data ``int8_data`` takes, read off a recipe dict (``Recipe.to_dict``, a checkpoint's recipe)."""
        return from_dict(DataConfig, recipe["data"], prefix="data.")

    @classmethod
    def int8_data(cls, data: Any, seed: int = 0) -> Int8Data:
        """Images to calibrate an INT8 export on and its scorer through onnxruntime (``data`` as
        ``stored_data`` reads it, or as ``evaluate_checkpoint`` takes it; ``seed`` draws subsets as a
        run with that seed did)."""
        raise NamPruneError(
            f"INT8 export (--int8, export.int8) is not available for a {cls.__name__}: nam-prune does not "
            f"compute its {cls.score_key} through onnxruntime; export FP32 ONNX instead"
        )

    @staticmethod
    def deploy_mode(model: nn.Module) -> ContextManager[nn.Module]:
        """The model as it is deployed (a detector returns only its decoded boxes)."""
        return contextlib.nullcontext(model)


class ClassificationTask(Task):
    """Image classifiers: torchvision-style data loaders, cross-entropy training, top-1."""

    exposes_gradients = True

    def __init__(self, recipe: "Recipe", device: torch.device) -> None:
        super().__init__(recipe, device)
        self.data = load_data(recipe.data, recipe.seed)
        self.teachers: dict[str, nn.Module] = {}
        self.check_teachers()

    def prepare(self) -> tuple[nn.Module, ModelRecord]:
        """Build (or load) the model and insert NAM gates unless the weights already have them."""
        recipe, data = self.recipe, self.data
        spec = ModelSpec(recipe.model.name, data.num_classes, data.input_shape[0], recipe.model.width)
        record = ModelRecord(spec=spec, input_shape=data.input_shape, nam=recipe.nam)
        weights = recipe.model.weights
        payload = read_checkpoint(weights, recipe.model.trust_pickle) if weights else None
        if payload is not None and is_nam_checkpoint(payload):
            record = record_of(payload)
            if tuple(record.input_shape) != tuple(data.input_shape):
                raise NamPruneError(
                    f"model.weights was trained on inputs {tuple(record.input_shape)} but data gives "
                    f"{tuple(data.input_shape)}; use the data set it was trained on"
                )
            model = from_payload(payload, weights).train()
            if record.nam is None:
                gates = resolved(model, recipe.nam)
                insert_nam(model, gates, record.example_input())
                record = replace(record, nam=gates)
            return model, record
        if recipe.model.pretrained and weights:
            raise NamPruneError("set model.weights or model.pretrained, not both")
        model = build_pretrained(spec, recipe.model.pretrained) if recipe.model.pretrained else build_model(spec)
        require_batchnorm(model)
        check_input(model, spec.name, data.input_shape)
        if payload is not None:  # a state dict, or a whole saved model allowed by model.trust_pickle
            load_state(model, state_dict_of(payload, f"model.weights {weights}"), weights)
        record = replace(record, nam=resolved(model, recipe.nam))
        insert_nam(model, record.nam, record.example_input())
        return model, record

    def build(self, gates: NAMConfig | None) -> tuple[nn.Module, ModelRecord]:
        data, model_config = self.data, self.recipe.model
        spec = ModelSpec(model_config.name, data.num_classes, data.input_shape[0], model_config.width)
        model = build_model(spec)
        gates = resolved(model, gates) if gates is not None else None
        record = ModelRecord(spec, data.input_shape, gates)
        if gates is not None:
            insert_nam(model, gates, record.example_input())
        return model.to(self.device), record

    def train(
        self, model, config, stage, on_epoch_end=None, resume=None, penalised=gate_scales, after_backward=None, warm_up=False
    ):
        teacher = self.load_teacher(config.teacher, stage) if config.teacher else None  # loaded once, at start
        history = fit(
            model, self.data.train, config, self.device, stage, on_epoch_end=on_epoch_end, resume=resume,
            penalised=penalised, compiled=self.recipe.nam.compile, after_backward=after_backward, teacher=teacher,
        )
        return [asdict(entry) for entry in history]

    def load_teacher(self, path: str, section: str) -> nn.Module:
        """A nam-prune checkpoint trained on this data, or a state dict of ``model.name``."""
        if path in self.teachers:
            return self.teachers[path]
        data, model_config = self.data, self.recipe.model
        payload = read_checkpoint(path, model_config.trust_pickle)
        if is_nam_checkpoint(payload):
            record = record_of(payload)
            if record.spec.num_classes != data.num_classes or tuple(record.input_shape) != tuple(data.input_shape):
                raise NamPruneError(
                    f"{section}.teacher {path} takes inputs {tuple(record.input_shape)} into {record.spec.num_classes} "
                    f"classes, this data {tuple(data.input_shape)} into {data.num_classes}; use a model trained on this data"
                )
            teacher = from_payload(payload, path)
        else:
            teacher = build_model(ModelSpec(model_config.name, data.num_classes, data.input_shape[0], model_config.width))
            load_state(teacher, state_dict_of(payload, f"{section}.teacher {path}"), path)
        self.teachers[path] = teacher.eval().requires_grad_(False)
        return self.teachers[path]

    def accumulate_gradients(self, model: nn.Module, batches: int) -> int:
        """Over the batches recalibration uses."""
        return accumulate_gradients(model, self._calibration(), batches, self.device)

    def score(self, model: nn.Module) -> float:
        return evaluate(model, self.data.test, self.device, "eval")

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        if self.data.train.generator is not None:
            self.data.train.generator.manual_seed(seed)

    def measure(self, model, example, stage):
        accuracy = evaluate(model, self.data.test, self.device, f"eval {stage}")
        return measure(model, example, self.recipe.report, accuracy).to_dict()

    def _calibration(self) -> DataLoader:
        """The calibration order, re-seeded: the same batches every time, so resumed runs stay exact."""
        calibration = self.data.calibration
        if calibration.generator is not None:
            calibration.generator.manual_seed(self.recipe.seed + 1)
        return calibration

    def recalibrate(self, model: nn.Module) -> int:
        return recalibrate_bn(model, self._calibration(), self.recipe.recalibrate, self.device)

    def rng_state(self) -> dict[str, Any]:
        """Random-number states to resume with (under torchrun the sampler is seeded per epoch instead)."""
        generator = self.data.train.generator
        return {**super().rng_state(), "loader": generator.get_state() if generator is not None else None}

    def restore_rng(self, state: dict[str, Any]) -> None:
        super().restore_rng(state)
        if self.data.train.generator is not None and state["loader"] is not None:
            self.data.train.generator.set_state(state["loader"])

    @classmethod
    def evaluate_checkpoint(cls, model: nn.Module, record: ModelRecord, data: DataConfig) -> dict[str, float]:
        bundle = load_data(data)
        if tuple(bundle.input_shape) != tuple(record.input_shape):
            raise NamPruneError(
                f"--data gives inputs {tuple(bundle.input_shape)} but the model takes {tuple(record.input_shape)}"
            )
        return {"accuracy": evaluate(model, bundle.test, torch.device("cpu"))}

    @classmethod
    def int8_data(cls, data: DataConfig, seed: int = 0) -> Int8Data:
        """``CALIBRATION_IMAGES`` training images drawn at random, unaugmented (as the deployed model
        sees its inputs), and top-1 on the test split."""
        if not isinstance(data, DataConfig):
            raise NamPruneError("a classifier calibrates on a data set name or a recipe .yaml, not an ultralytics data yaml")
        bundle = load_data(replace(data, augment=False), seed)
        images = random_subset(bundle.train.dataset, CALIBRATION_IMAGES, seed)
        loader = DataLoader(images, batch_size=data.batch_size, num_workers=data.workers)
        return Int8Data(
            bundle.input_shape, lambda _shape: (x for x, _ in loader), len(images),  # type: ignore[arg-type]
            lambda path: ort_top1(ort_session(path), bundle.test), len(bundle.test.dataset),  # type: ignore[arg-type]
        )


def task_class(model_name: str) -> type[Task]:
    """The task of the family that claims ``model_name`` (classification unless it names its own)."""
    family = family_for(model_name)
    return family.task() if family.task else ClassificationTask


def int8_data_for(
    task: type[Task], payload: dict[str, Any], source: str, data: Any = None, option: str = "--calibration"
) -> Int8Data:
    """``task.int8_data`` on ``data`` (as ``option`` names it), else on the data and seed of the recipe a
    run stored in its checkpoint ``payload``: the images it trained and was scored on."""
    if data is not None:
        return task.int8_data(data)
    recipe = payload.get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data"), dict):
        raise NamPruneError(f"{source} stores no recipe to calibrate on: name the data with {option} "
                            "(a data set name or a recipe .yaml)")
    return task.int8_data(task.stored_data(recipe), int(recipe.get("seed", 0)))
