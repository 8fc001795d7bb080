"""Stage 1a: build the model to compress, from a name the checkpoint can record.

Every model is described by a small :class:`ModelSpec` of plain values, so a saved
checkpoint can rebuild the exact architecture without pickling any class.

Model families are plug-ins (:class:`ModelFamily`). Built in: CIFAR-style ResNets (ours,
the standard pruning benchmark), torchvision classification models by name, timm models
(``timm:NAME``) and a user factory (``module.path:function``). Other families register
through the ``nam_prune.families`` entry-point group (nam-prune's own YOLO family does),
so the core never imports them and nothing of theirs loads until a model of theirs is used.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from nam_prune.config import printable
from nam_prune.errors import NamPruneError


@dataclass
class ModelSpec:
    """What is needed to rebuild a dense model: name, classes, input channels, width.

    ``config`` is the architecture yaml (as plain values) of a YOLO model loaded from an
    ultralytics checkpoint, whose name alone does not say how it was built.
    """

    name: str = "resnet20"
    num_classes: int = 10
    in_channels: int = 3
    width: int = 16
    config: dict[str, Any] | None = None


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, no max-pool, three stages of basic blocks (He et al., 2016).

    Shortcuts are 1x1 conv + BN (option B) so every stage is prunable by the dependency graph.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise NamPruneError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, planes, inplanes = [], width, width
        for stage in range(3):
            stride = 1 if stage == 0 else 2
            layers = []
            for index in range(blocks):
                downsample = None
                if index == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                    )
                layers.append(BasicBlock(inplanes, planes, stride if index == 0 else 1, downsample))
                inplanes = planes
            stages.append(nn.Sequential(*layers))
            planes *= 2
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _cifar_resnet(depth: int):
    def build(spec: ModelSpec) -> nn.Module:
        return CifarResNet(depth, spec.num_classes, spec.in_channels, spec.width)

    return build


def _resnet50_cifar(spec: ModelSpec) -> nn.Module:
    """torchvision ResNet-50 adapted to 32x32 inputs: 3x3 stride-1 stem and no max-pool."""
    model = torchvision.models.resnet50(weights=None, num_classes=spec.num_classes)
    model.conv1 = nn.Conv2d(spec.in_channels, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


CIFAR_MODELS = {
    "resnet8": _cifar_resnet(8),
    "resnet14": _cifar_resnet(14),
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    "resnet110": _cifar_resnet(110),
    "resnet50_cifar": _resnet50_cifar,
}


def _set_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first conv so the model takes ``in_channels`` (e.g. 1 for Fashion-MNIST)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(
                        parent,
                        child_name,
                        nn.Conv2d(
                            in_channels,
                            child.out_channels,
                            child.kernel_size,
                            child.stride,
                            child.padding,
                            child.dilation,
                            child.groups if child.groups == 1 else in_channels,
                            child.bias is not None,
                        ),
                    )
                return model
    raise NamPruneError("model has no Conv2d layer: nam-prune compresses convolutional networks")


def _torchvision(spec: ModelSpec) -> nn.Module:
    model = torchvision.models.get_model(spec.name, weights=None, num_classes=spec.num_classes)
    return _set_input_channels(model, spec.in_channels) if spec.in_channels != 3 else model


def _timm(spec: ModelSpec) -> nn.Module:
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise NamPruneError("model.name uses timm but timm is not installed: pip install 'nam-prune[timm]'") from None
    return timm.create_model(spec.name[5:], pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_channels)


def _from_factory(spec: ModelSpec) -> nn.Module:
    """Call a user factory ``module.path:function(num_classes=, in_channels=)``."""
    module_path, _, attr = spec.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as error:
        raise NamPruneError(
            f"cannot import model factory '{spec.name}' ({error}); check the module is on PYTHONPATH"
        ) from None
    model = factory(num_classes=spec.num_classes, in_channels=spec.in_channels)
    if not isinstance(model, nn.Module):
        raise NamPruneError(f"model factory '{spec.name}' returned {type(model).__name__}, not an nn.Module")
    return model


@dataclass(frozen=True)
class ModelFamily:
    """A source of models the pipeline can compress.

    claims: whether a ``model.name`` belongs to this family. build: the dense, randomly
    initialised model of a spec. section: the recipe section (name, config dataclass) the
    family reads. trace_stand_ins: block types torch-pruning should trace through a simpler
    forward with the same convs and shapes (it cannot map some reshapes), loaded on use.
    task: the run-time adapter class (see ``nam_prune.tasks.Task``), loaded on use; ``None``
    means image classification.
    """

    name: str
    claims: Callable[[str], bool]
    build: Callable[[ModelSpec], nn.Module]
    section: tuple[str, type] | None = None
    trace_stand_ins: Callable[[], dict[type, Callable[[nn.Module, Any], Any]]] | None = None
    task: Callable[[], type] | None = None


BUILTIN_FAMILIES = (
    ModelFamily("cifar", lambda name: name in CIFAR_MODELS, lambda spec: CIFAR_MODELS[spec.name](spec)),
    ModelFamily("timm", lambda name: name.startswith("timm:"), _timm),
    ModelFamily("torchvision", lambda name: name in torchvision.models.list_models(torchvision.models), _torchvision),
)
FACTORY_FAMILY = ModelFamily("factory", lambda name: ":" in name, _from_factory)
"""Tried last: a ``module:function`` name that no other family claims."""


@functools.cache
def plugin_families() -> tuple[ModelFamily, ...]:
    """Families registered by installed packages under the ``nam_prune.families`` entry-point group."""
    found = []
    for point in entry_points(group="nam_prune.families"):
        family = point.load()
        if not isinstance(family, ModelFamily):
            raise NamPruneError(f"entry point {point.value} is not a nam_prune.models.ModelFamily")
        found.append(family)
    return tuple(found)


def families() -> tuple[ModelFamily, ...]:
    return (*BUILTIN_FAMILIES, *plugin_families(), FACTORY_FAMILY)


def available_models() -> list[str]:
    return sorted(CIFAR_MODELS) + sorted(torchvision.models.list_models(torchvision.models))


def family_for(name: str) -> ModelFamily:
    """The family that claims ``name``; an unknown name suggests the closest known one."""
    for family in families():
        if family.claims(name):
            return family
    close = difflib.get_close_matches(name, available_models(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise NamPruneError(
        f"unknown model.name '{printable(name)}'{hint}; use a CIFAR ResNet (resnet20, resnet56, "
        "resnet50_cifar), a torchvision name, 'timm:NAME', 'package.module:factory' or a YOLO yaml (yolov8n.yaml)"
    )


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the dense, randomly initialised model a spec describes (no download, ever)."""
    return family_for(spec.name).build(spec)
