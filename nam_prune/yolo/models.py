"""Stage 1 for ultralytics detectors: build or load a YOLO model and make it prunable.

* ``build_yolo`` builds a ``DetectionModel`` from its yaml (``yolov8n.yaml``, ``yolo11s.yaml``,
  or the yaml dict a trained ``.pt`` carries) with random weights: nothing is downloaded.
* ``make_split_free`` rewrites every C2f / C3k2 (whose ``cv1`` output is cut in two with
  ``chunk``) into :class:`C2fSplitFree`, where the two halves come from two convolutions.
  The numbers are unchanged, and each half becomes its own prunable channel group, so
  the dependency graph never has to cut a tensor that is later split in fixed halves.
* ``protected_parts`` names what is never pruned: the Detect head (its branches, DFL and
  final convs) and attention blocks (C2PSA, PSABlock), left intact so their heads and key
  dimensions stay valid; only their input width may follow the layer feeding them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.checkpoint import read_checkpoint
from nam_prune.errors import NamPruneError
from nam_prune.prune.graph import IntactBlock, StandIns

ATTENTION_BLOCKS = frozenset({"C2PSA", "PSA"})
"""ultralytics blocks whose channel counts encode attention heads: left intact but for their input width."""
RESIDUAL_ATTENTION = frozenset({"PSABlock"})
"""Attention layers on a residual stream (inside C2fPSA, C3k2 with attn): left wholly intact."""


def ultralytics_module():
    """``ultralytics.nn.tasks``, or a one-line error saying how to install ultralytics."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for hub weights or update checks
    try:
        from ultralytics.nn import tasks
    except ImportError as error:
        raise NamPruneError(
            "YOLO models need ultralytics: pip install 'nam-prune[yolo]' (or pip install ultralytics)"
        ) from error
    return tasks


class NAMPrunedModel(nn.Module):
    """The first row of a pruned checkpoint's yaml. ultralytics' default trainer rebuilds a model
    from its yaml, which cannot describe pruned widths; this row stops it with the fix instead
    of silently training a dense model with the weights whose shapes still match."""

    def __init__(self, *args: Any) -> None:
        raise NamPruneError(
            "this YOLO model was pruned by nam-prune and cannot be rebuilt from its yaml: train it with "
            "YOLO(path).train(..., trainer=nam_prune.yolo.NAMDetectionTrainer)"
        )


def _yaml_marker() -> "YamlMarker":
    """Make ultralytics' yaml parser resolve the marker row (it looks names up in its module).

    Called when a nam-prune ultralytics checkpoint is unpickled (see :class:`YamlMarker`),
    never on import: the one moment a marked yaml can reach ultralytics' own trainer.
    """
    ultralytics_module().NAMPrunedModel = NAMPrunedModel
    return YamlMarker()


class YamlMarker:
    """Stored on a pruned ultralytics checkpoint's model; unpickling it runs :func:`_yaml_marker`."""

    def __reduce__(self):
        return _yaml_marker, ()


def marked_yaml(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its first backbone row replaced by :class:`NAMPrunedModel`."""
    marked = copy.deepcopy(config)
    marked["backbone"] = [[-1, 1, "NAMPrunedModel", []], *marked["backbone"][1:]]
    return marked


class C2fSplitFree(nn.Module):
    """C2f / C3k2 with ``cv1`` as two convolutions instead of one conv whose output is chunked.

    ``forward`` computes exactly what ``C2f.forward`` does: ``cv2(cat([a, b, m1(b), m2(m1(b)), ...]))``.
    """

    def __init__(self, cv1a: nn.Module, cv1b: nn.Module, m: nn.ModuleList, cv2: nn.Module) -> None:
        super().__init__()
        self.cv1a, self.cv1b, self.m, self.cv2 = cv1a, cv1b, m, cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(block(y[-1]) for block in self.m)
        return self.cv2(torch.cat(y, 1))


def _conv_slice(conv: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of an ultralytics ``Conv`` (conv + BN + act) keeping only output channels ``start:stop``."""
    part = copy.deepcopy(conv)
    dropped = [i for i in range(conv.conv.out_channels) if not start <= i < stop]
    tp.prune_conv_out_channels(part.conv, dropped)
    tp.prune_batchnorm_out_channels(part.bn, dropped)
    return part


def make_split_free(model: nn.Module) -> int:
    """Replace every C2f-style block (C2f, C3k2) in ``model.model`` in place; returns how many."""
    tasks = ultralytics_module()
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, tasks.C2f):
                continue
            if not hasattr(child.cv1, "bn"):
                raise NamPruneError(
                    "this YOLO model is fused (BatchNorm folded into the convs): NAM ranks channels by BN "
                    "scales, so start from the unfused training checkpoint (best.pt / last.pt) or the yaml"
                )
            half = child.c
            block = C2fSplitFree(_conv_slice(child.cv1, 0, half), _conv_slice(child.cv1, half, 2 * half), child.m, child.cv2)
            for attr in ("i", "f", "type", "np"):  # ultralytics' routing attributes on top-level layers
                if hasattr(child, attr):
                    setattr(block, attr, getattr(child, attr))
            setattr(parent, name, block.train(child.training))
            converted += 1
    return converted


def build_yolo(name: str, num_classes: int, in_channels: int, config: dict[str, Any] | None = None) -> nn.Module:
    """A split-free ``DetectionModel`` from a yaml name (or the yaml dict ``config``), randomly initialised."""
    tasks = ultralytics_module()
    source: Any = dict(config) if config else name
    if not config and not name.endswith((".yaml", ".yml")):
        raise NamPruneError(f"model.name {name!r}: build YOLO models from a yaml (yolov8n.yaml, yolo11n.yaml)")
    try:
        model = tasks.DetectionModel(source, ch=in_channels, nc=num_classes, verbose=False)
    except FileNotFoundError as error:
        raise NamPruneError(
            f"ultralytics has no model yaml {name!r}; use e.g. yolov8n.yaml, yolov8s.yaml, yolo11n.yaml or a path"
        ) from error
    make_split_free(model)
    return model


def load_ultralytics_checkpoint(path: str | Path, trust_pickle: bool) -> nn.Module:
    """The model inside a user's ultralytics ``.pt`` (a pickle: allowed only with ``trust_pickle``)."""
    path = Path(path)
    if not path.is_file():
        raise NamPruneError(
            f"YOLO checkpoint {path} does not exist: train one with 'nam-prune train-detector yolov8n.yaml --out DIR' "
            "(then model.name: DIR/weights/best.pt) or name a model yaml"
        )
    if not trust_pickle:
        raise NamPruneError(
            f"{path} is an ultralytics checkpoint, a pickle that can run code when loaded; set "
            "model.trust_pickle: true only if you trust its source"
        )
    payload = read_checkpoint(path, trust_pickle=True)
    model = payload.get("ema") or payload.get("model") if isinstance(payload, dict) else None
    tasks = ultralytics_module()
    if not isinstance(model, tasks.DetectionModel):
        raise NamPruneError(f"{path} holds no ultralytics detection model (found {type(model).__name__})")
    model = model.float()
    for parameter in model.parameters():  # ultralytics checkpoints are saved with requires_grad off
        parameter.requires_grad_(True)
    for dfl in (m for m in model.modules() if type(m).__name__ == "DFL"):
        dfl.requires_grad_(False)  # the DFL conv is a fixed integral, never trained
    make_split_free(model)
    return model


def _cv2_of_cv1(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """C2PSA / PSA traced as ``cv2(cv1(x))``: the same widths, without the attention reshapes."""
    return block.cv2(block.cv1(x))


def _ffn_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PSABlock traced as ``x + ffn(x)``: its residual coupling, without the attention reshapes."""
    return x + block.ffn(x)


def attention_stand_ins() -> StandIns:
    """How torch-pruning traces ultralytics' attention blocks (their reshapes defeat its index mapping)."""
    ultralytics_module()
    from ultralytics.nn.modules import block

    pairs = (("C2PSA", _cv2_of_cv1), ("PSA", _cv2_of_cv1), ("PSABlock", _ffn_residual))
    return {getattr(block, name): stand_in for name, stand_in in pairs if hasattr(block, name)}


def protected_parts(model: nn.Module) -> tuple[list[nn.Module], list[IntactBlock]]:
    """Layers never used as pruning roots and blocks whose inner channels must not change.

    The Detect head is intact: only the input width of each branch's first conv may follow
    the neck. Attention blocks are intact except their first conv's input.
    """
    head = model.model[-1]
    blocks = [IntactBlock("detect head", head, _branch_entries(head))]
    seen = set(head.modules())
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in ATTENTION_BLOCKS | RESIDUAL_ATTENTION and module not in seen:
            entries = [module.cv1.conv] if kind in ATTENTION_BLOCKS else []
            blocks.append(IntactBlock(f"{name} ({kind})", module, entries))
            seen.update(module.modules())
    return [head], blocks


def _branch_entries(head: nn.Module) -> list[nn.Conv2d]:
    """The first Conv2d of every per-scale branch of a Detect head (the convs fed by the neck)."""
    entries = []
    for branches in head.children():
        if isinstance(branches, nn.ModuleList):
            for branch in branches:
                first = next((m for m in branch.modules() if isinstance(m, nn.Conv2d)), None)
                if first is not None:
                    entries.append(first)
    return entries


def scope_end(model: nn.Module, scope: str) -> int:
    """Layers ``model.model[:end]`` are in scope: the backbone (the yaml's ``backbone`` rows), or all but Detect."""
    return len(model.yaml["backbone"]) if scope == "backbone" else len(model.model) - 1


def scope_prefixes(model: nn.Module, scope: str) -> list[str]:
    """Module-name prefixes of the layers NAM gates go into."""
    return [f"model.{i}." for i in range(scope_end(model, scope))]
