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
import logging
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from nam_prune.checkpoint import read_checkpoint
from nam_prune.config import printable
from nam_prune.errors import NamPruneError, first_line

log = logging.getLogger("nam_prune")


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
    except ImportError as error:
        raise NamPruneError("model.name uses timm but timm is not installed: pip install 'nam-prune[timm]'") from error
    name = spec.name[5:]
    if not timm.is_model(name):
        raise NamPruneError(
            f"timm has no model {name!r}: list its names with python -c \"import timm; print(timm.list_models('*{name[:4]}*'))\""
        )
    return timm.create_model(name, pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_channels)


def _from_factory(spec: ModelSpec) -> nn.Module:
    """Call a user factory ``module.path:function(num_classes=, in_channels=)``."""
    module_path, _, attr = spec.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as error:
        raise NamPruneError(
            f"cannot import model factory '{spec.name}' ({error}); check the module is on PYTHONPATH"
        ) from error
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
    means image classification. commands: click commands the family adds to ``nam-prune``
    (YOLO's ``train-detector``).
    """

    name: str
    claims: Callable[[str], bool]
    build: Callable[[ModelSpec], nn.Module]
    section: tuple[str, type] | None = None
    trace_stand_ins: Callable[[], dict[type, Callable[[nn.Module, Any], Any]]] | None = None
    task: Callable[[], type] | None = None
    commands: Callable[[], list[Any]] | None = None


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


INPUT_SIZES = (8, 16, 24, 32, 48, 64, 75, 96, 128, 160, 192, 224, 256, 299, 320, 384)
"""Square sizes tried when a model rejects its input, to name the smallest one it takes."""


def forward_error(model: nn.Module, shape: tuple[int, ...]) -> Exception | None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
        return None
    except Exception as error:  # conv/pool layers raise RuntimeError or ValueError for small inputs
        return error
    finally:
        model.train(was_training)


def check_input(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """Run one forward at ``input_shape``; if the model rejects it, say why in one line and
    name the smallest square size it takes (the ``data.image_size`` to set)."""
    error = forward_error(model, input_shape)
    if error is None:
        return
    channels, height, width = input_shape
    reason = first_line(error)
    size = smallest_size_above(model, input_shape)
    if size is not None:
        raise NamPruneError(
            f"{name} cannot take {height}x{width} inputs ({reason}); the smallest size it takes is "
            f"{size}x{size}: set data.image_size: {size}"
        )
    raise NamPruneError(f"{name} fails on a {channels}x{height}x{width} input ({reason}); check model.name and the data")


def smallest_size_above(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """The smallest square size of ``INPUT_SIZES`` above ``input_shape``'s that ``model`` runs on."""
    channels, height, width = input_shape
    for size in INPUT_SIZES:
        if size > min(height, width) and forward_error(model, (channels, size, size)) is None:
            return size
    return None


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the dense, randomly initialised model a spec describes (no download, ever)."""
    return family_for(spec.name).build(spec)


def _adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first conv's RGB kernels for ``channels`` inputs (timm's rule): summed to one for gray,
    else tiled and rescaled so the expected activation stays the same."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    tiled = weight.repeat(1, (channels + weight.shape[1] - 1) // weight.shape[1], 1, 1)[:, :channels]
    return tiled * (weight.shape[1] / channels)


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load pretrained ``state`` into ``model``: tensors of equal shape as they are, a first conv
    adapted to the input channels; tensors whose shape differs (a classifier for other classes)
    keep their fresh values and are returned. A missing tensor means another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise NamPruneError(
            f"{source} does not fit this architecture: missing {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} ({len(missing)} tensors); check model.name"
        )
    loaded, fresh = {}, []
    for key, value in own.items():
        theirs = state.get(key)
        if theirs is None or not isinstance(theirs, torch.Tensor):
            continue
        if theirs.shape == value.shape:
            loaded[key] = theirs
        elif value.dim() == 4 and theirs.dim() == 4 and theirs.shape[0] == value.shape[0] and theirs.shape[2:] == value.shape[2:]:
            loaded[key] = _adapt_input_channels(theirs, value.shape[1])
        else:
            fresh.append(key)
    load_with_versions(model, {**own, **loaded})
    return fresh


def load_with_versions(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` with the model's own module versions attached: saved files hold
    plain dicts, and some modules (torchvision's MNASNet) refuse a state without them."""
    versioned = OrderedDict(state)
    versioned._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(versioned)


def torchvision_weights_file(name: str, tag: str) -> tuple[Path, str]:
    """Where torch's hub cache keeps torchvision's ``tag`` weights of ``name``, and their URL."""
    try:
        weights_enum = torchvision.models.get_model_weights(name)
    except (KeyError, ValueError):  # the lookup's own error only repeats the name: not chained
        raise NamPruneError(f"torchvision has no pretrained weights for {name}; unset model.pretrained") from None
    try:
        weights = weights_enum[tag]
    except KeyError:  # a bare KeyError of the tag: not chained, the message lists the choices
        choices = ", ".join(dict.fromkeys(["DEFAULT", *weights_enum.__members__]))  # some enums list DEFAULT too
        raise NamPruneError(f"model.pretrained '{printable(tag)}' is not a weight of {name}: choose one of {choices}") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name, weights.url


def _torchvision_pretrained(spec: ModelSpec, tag: str) -> dict[str, torch.Tensor]:
    path, url = torchvision_weights_file(spec.name, tag)
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as error:  # offline: URLError, socket errors, a refused folder
            reason = first_line(error, 120)
            raise NamPruneError(
                f"pretrained weights {spec.name}/{tag} are not cached and cannot be downloaded ({reason}): "
                f"put {path.name} (from {url}) in {path.parent}"
            ) from error
    return read_checkpoint(path)


def _timm_pretrained(spec: ModelSpec, tag: str) -> nn.Module:
    """timm's own loader (it resets the classifier and adapts the stem); a file placed in
    torch's hub cache as ``timm/<name>.safetensors`` or ``.pth`` is used before the network."""
    timm = importlib.import_module("timm")
    name = spec.name[5:] if tag == "DEFAULT" else f"{spec.name[5:]}.{tag}"
    local = [Path(torch.hub.get_dir()) / "checkpoints" / "timm" / f"{name}{ext}" for ext in (".safetensors", ".pth")]
    overlay = next(({"file": str(p)} for p in local if p.is_file()), None)
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=spec.num_classes, in_chans=spec.in_channels, pretrained_cfg_overlay=overlay
        )
    except Exception as error:  # offline: huggingface_hub / urllib raise many types
        reason = first_line(error, 120)
        raise NamPruneError(
            f"timm could not load pretrained weights for {name} ({reason}): put the weights file "
            f"(model.safetensors from https://huggingface.co/timm/{name}) at {local[0]}"
        ) from error


def build_pretrained(spec: ModelSpec, tag: str) -> nn.Module:
    """The model of ``spec`` started from pretrained weights (``model.pretrained``: a torchvision
    weight name such as ``DEFAULT`` or ``IMAGENET1K_V2``, or a timm tag). The classifier is new
    when ``num_classes`` differs; the stem is adapted to the input channels."""
    family = family_for(spec.name)
    if family.name == "timm":
        return _timm_pretrained(spec, tag)
    if family.name != "torchvision":
        raise NamPruneError(f"model.pretrained needs a torchvision or timm model, not '{spec.name}'; use model.weights")
    model = build_model(spec)
    source = f"{spec.name}/{tag}"
    fresh = load_matching(model, _torchvision_pretrained(spec, tag), source)
    if fresh:
        log.info("pretrained %s: new %s (shape differs: %d classes)", source, ", ".join(fresh), spec.num_classes)
    return model
