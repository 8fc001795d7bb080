"""Stage 1b: insert NAM gates into a model that was not written with them.

One verb, one config (torchao style): ``insert_nam(model, NAMConfig(...))`` rewires the
model in place by replacing each chosen BatchNorm2d with ``NAMGated(bn, gate)``, so the
model's own ``forward`` keeps working unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMGated, NAMSpatialGate, affine_fit
from nam_prune.sparsity import Regularizer

log = logging.getLogger("nam_prune")

Placement = Literal["every_bn", "block_end"]
Gate = Literal["closing", "reference"]

RESIDUAL_BLOCK_LAST_NORM = {BasicBlock: "bn2", Bottleneck: "bn3"}
"""Where the reference puts NAM in a residual block: on the last BN, before the addition."""

OPEN_GATE_BIAS = 6.0
"""``nam.gate_bias: auto`` outside ResNets: the gate starts at ``|gamma| * 0.998 * x``, nearly the plain layer
(why: docs/ranking.md)."""


def _built_of_residual_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has torchvision's ResNet blocks: where NAM's SiLU-shaped gate (bias 0) wins."""
    return any(isinstance(m, tuple(RESIDUAL_BLOCK_LAST_NORM)) for m in model.modules())


def resolved(model: nn.Module, config: NAMConfig) -> NAMConfig:
    """``config`` with ``gate_bias: auto`` made the number it means for ``model``: 0 for the paper's gate and
    for models built of torchvision's residual blocks (ResNets), ``OPEN_GATE_BIAS`` otherwise. Records store
    this, so a run's files say which bias it trained with."""
    if config.gate_bias != "auto":
        return config
    closed_start = config.gate == "reference" or _built_of_residual_blocks(model)
    return replace(config, gate_bias=0.0 if closed_start else OPEN_GATE_BIAS)


def resolved_regularizer(model: nn.Module, regularizer: str) -> Regularizer:
    """``sparsity.regularizer: auto`` made concrete for a classifier: polarization for closing gates on
    models built of torchvision's residual blocks (ahead of L1 on ResNet-20 by 2.4 points fine-tuned), L1 for
    the paper's gate (its own) and on models without those blocks, where polarization cost MobileNetV2 and
    CSPDarknet 1.4-4.2 points at 80% of the MACs removed (docs/ranking.md). The split is by architecture, as
    ``nam.gate_bias: auto``'s; a pinned bias does not move it. A model without gates (a control) gets
    polarization, the default before ``auto``."""
    if regularizer != "auto":
        return regularizer
    gates = [m for m in model.modules() if isinstance(m, NAMChannelGate)]
    if any(not gate.closing for gate in gates):
        return "l1"
    return "polarization" if not gates or _built_of_residual_blocks(model) else "l1"


@dataclass
class NAMConfig:
    """How NAM gates are placed.

    gate: ``closing`` (``|gamma| * sigmoid(BN(x)) * x``, a channel is off when its gamma
        is 0, so pruning it is free) or ``reference`` (the paper's ``sigmoid(w * BN(x)) * x``,
        to reproduce it; train it with ``sparsity.regularizer: l1``).
    placement: ``every_bn`` gates the output of every conv-BN pair, so every prunable
        channel group is ranked by its own gate; ``block_end`` gates the last BN of each
        residual block, where the reference implementation puts it.
    gate_bias: each gate BN's initial bias. At 0 a closing gate starts as ``|gamma| * sigmoid(x_hat) * x``, a
        SiLU-like non-linearity on every gated layer, linear bottlenecks included, which slows learning
        (MobileNetV2: 10.6 points of top-1 after 6 epochs, ``benchmarks/gate_cost``); a positive bias starts
        it near ``|gamma| * x`` and the penalty still closes a channel by driving its gamma to 0. ``auto``
        (:func:`resolved`) is 0 for torchvision ResNets and the paper's gate, ``OPEN_GATE_BIAS`` otherwise.
    spatial: add the pixel gate too (off by default, as in the reference code).
    grad_through_weights: let the gradient flow through ``w = |gamma|/sum|gamma|``
        (the reference detaches it).
    compile: train through ``torch.compile``: a classifier's whole model (its gates traced with it,
        fused with BN and activation); YOLO, trained by ultralytics, its gates (one dynamic-shape graph).
    include: gate only modules whose names start with one of these prefixes (empty: all);
        the YOLO pipeline fills it with the backbone (and neck) layers.
    """

    gate: Gate = "closing"
    placement: Placement = "every_bn"
    gate_bias: float | Literal["auto"] = "auto"
    spatial: bool = False
    grad_through_weights: bool = False
    compile: bool = False
    include: list[str] = field(default_factory=list)


def _block_end_norms(model: nn.Module) -> set[nn.Module]:
    norms: set[nn.Module] = set()
    for module in model.modules():
        for block_type, attr in RESIDUAL_BLOCK_LAST_NORM.items():
            if isinstance(module, block_type):
                norms.add(getattr(module, attr))
        if isinstance(module, InvertedResidual):
            norms.add([m for m in module.conv.modules() if isinstance(m, nn.BatchNorm2d)][-1])
    if not norms:
        raise NamPruneError(
            "nam.placement 'block_end' found no residual block (torchvision BasicBlock, Bottleneck "
            "or InvertedResidual) in this model; use nam.placement: every_bn"
        )
    return norms


def _bn_output_sizes(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, tuple[int, int]]:
    """Run one forward pass to record the H x W each BatchNorm2d sees (needed by spatial gates)."""
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _inp, out: sizes.__setitem__(mod, tuple(out.shape[-2:])))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return sizes


def _gated_norms(model: nn.Module) -> set[nn.Module]:
    """BatchNorms that already belong to NAM (hosts or gate norms): never wrapped again."""
    taken: set[nn.Module] = set()
    for module in model.modules():
        if isinstance(module, NAMGated):
            taken.update(module.modules())
        if _fusable(module) and isinstance(module.act, NAMGated):
            taken.add(module.bn)
    return taken


def _fusable(module: nn.Module) -> bool:
    """An ultralytics-style ``Conv`` (conv -> bn -> act) that ``model.fuse()`` folds at predict time.

    Its gate goes after ``act`` rather than replacing ``bn``, so fusing the BN into the conv
    stays exact and ultralytics' own predict/export paths keep working.
    """
    return all(hasattr(module, a) for a in ("conv", "bn", "act", "forward_fuse")) and isinstance(module.bn, nn.BatchNorm2d)


def require_batchnorm(model: nn.Module) -> None:
    """Stop early, with the reason, for models NAM cannot rank (LayerNorm designs, no norm at all)."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise NamPruneError(
            "no BatchNorm2d found to attach NAM gates to: NAM ranks channels by BN scale factors, "
            "so the model needs conv-BN layers"
        )


def insert_nam(
    model: nn.Module,
    config: NAMConfig | None = None,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Insert NAM gates into ``model`` in place and return it.

    ``example_input`` is needed only for spatial gates, which record the H x W they see.
    BatchNorms that already carry a gate are left alone, so calling it twice is harmless.
    """
    config = resolved(model, config or NAMConfig())
    if config.spatial and example_input is None:
        raise NamPruneError("spatial NAM gates need an example input to record their H x W")
    taken = _gated_norms(model)
    wanted = _block_end_norms(model) if config.placement == "block_end" else None
    sizes = _bn_output_sizes(model, example_input) if config.spatial else {}
    names = {m: n for n, m in model.named_modules()}
    inserted = 0
    for parent in list(model.modules()):
        if isinstance(parent, (NAMGated, NAMChannelGate)):
            continue
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.BatchNorm2d) or child in taken:
                continue
            if wanted is not None and child not in wanted:
                continue
            if config.include and not names[child].startswith(tuple(config.include)):
                continue
            spatial = None
            if config.spatial:
                spatial = NAMSpatialGate(*sizes[child], grad_through_weights=config.grad_through_weights)
            gate = NAMChannelGate(
                child.num_features, grad_through_weights=config.grad_through_weights, closing=config.gate == "closing",
                bias=config.gate_bias,
            )
            if _fusable(parent) and parent.bn is child:
                parent.act = NAMGated(parent.act, gate, spatial).to(child.weight.device)
            else:
                setattr(parent, child_name, NAMGated(child, gate, spatial).to(child.weight.device))
            inserted += 1
    if inserted == 0 and not taken:
        require_batchnorm(model)
        raise NamPruneError("no BatchNorm2d matches nam.placement / nam.include: widen them so some layers get gates")
    log.info("inserted %d NAM gate(s) (placement=%s, spatial=%s, gate_bias=%g)", inserted, config.placement, config.spatial,
             config.gate_bias)
    return model


def strip_gates(model: nn.Module, fold: bool = True) -> nn.Module:
    """Replace every ``NAMGated`` by its host layer, in place: the deployable model without gates.

    A BatchNorm host absorbs its channel gate's best affine fit (``affine_fit``: least squares
    over the inputs the gate saw in training), so the plain model starts close to the gated
    one; other hosts (an activation, in YOLO) drop the gate's scaling: folding it through the
    activation into the BN before it started fine-tuning closer and ended it lower (docs/yolo.md).
    Fine-tune after stripping (``prune.strip_gates: true`` does). ``fold=False`` only restores the
    architecture, for weights that are loaded next, or for gates already opened (``NAMGated.opening`` 1).
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, NAMGated):
                host = child.host
                if fold and isinstance(host, nn.BatchNorm2d) and host.affine:
                    slope, intercept = affine_fit(child.channel)
                    with torch.no_grad():
                        host.bias.mul_(slope).add_(intercept)
                        host.weight.mul_(slope)
                setattr(parent, child_name, host)
    return model
