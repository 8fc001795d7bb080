"""Blocks whose forward torch-pruning cannot follow on its own, and how we get through them.

* torchvision's ShuffleNetV2 block permutes channels with a view that torch-pruning cannot
  map; it is traced through a stand-in without the shuffle, and the channels the shuffle
  moves (block outputs, the pass-through half) are never cut. The branches' inner widths
  and a stride-2 block's inputs are cut as usual.
* torchvision's MaxViT attention layers are traced as identities (their window reshapes
  make torch-pruning's group search grow without end); the channel stream they share with the
  MBConv residuals stays, the MBConv expansions are cut.
* timm's Ghost modules output [primary | cheap copy] channels and slice them to a width
  stored in ``out_chs``; they are traced without the slice, a cut laid out like their output
  takes the same positions in both halves (``tied_copies``), and ``out_chs`` is set to what
  is left (``sync_widths``). A module whose slice drops channels (an odd width), and the
  one whose output joins a residual add, keep their output channels.
* timm's ReXNet blocks add their input to part of their output (a sliced add that
  torch-pruning's group search never finishes); they are traced through their conv path
  alone and keep their input and output channels: their expanded inner widths are cut.
* timm's CSP stages split their expanded channels at a stored ``expand_chs // 2`` (and
  torch-pruning loses a consumer of the second half): the expanded channels stay, the
  blocks inside and the transitions are cut.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

StandIns = dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]]
"""Block type -> a forward with the same layers and shapes that torch-pruning can trace."""
Frozen = set[tuple[nn.Module, "bool | None"]]
"""(module, out channels?) pairs that must not be cut; ``None``: either direction."""


def _shuffle_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ShuffleNetV2 block without its channel shuffle; split sizes are explicit since
    torch-pruning mis-maps ``chunk``."""
    if block.stride == 1:
        half = x.shape[1] // 2
        passed, through = torch.split(x, [half, x.shape[1] - half], dim=1)
        return torch.cat((passed, block.branch2(through)), dim=1)
    return torch.cat((block.branch1(x), block.branch2(x)), dim=1)


def _shuffle_block_type() -> type:
    from torchvision.models.shufflenetv2 import InvertedResidual

    return InvertedResidual


def _ghost_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Ghost module whose slice keeps everything, without the slice (torch-pruning then
    couples each cheap channel to the primary channel it is computed from)."""
    primary = module.primary_conv(x)
    both = torch.cat([primary, module.cheap_operation(primary)], dim=1)
    return both if module.out_chs >= both.shape[1] else both[:, : module.out_chs]


def _is_partial_residual(module: nn.Module) -> bool:
    """timm's ReXNet block: it adds its input to the first ``in_channels`` of its output."""
    return all(hasattr(module, a) for a in ("conv_pwl", "conv_dw", "use_shortcut", "in_channels"))


def _partial_residual(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ReXNet block's conv path alone: torch-pruning cannot follow its sliced add (group
    search does not end), and its inputs and outputs stay uncut anyway (``frozen_channels``)."""
    if module.conv_exp is not None:
        x = module.conv_exp(x)
    x = module.conv_dw(x)
    if module.se is not None:
        x = module.se(x)
    return module.conv_pwl(module.act_dw(x))


def _maxvit_types() -> tuple[type, type]:
    from torchvision.models.maxvit import MBConv, PartitionAttentionLayer

    return MBConv, PartitionAttentionLayer


def _pass_through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaxViT's window/grid attention, as torch-pruning sees it: its reshapes make the group
    search grow without end, and it keeps its width, so the stream it sits on stays uncut."""
    return x


def stand_ins(model: nn.Module) -> StandIns:
    """The stand-ins for the blocks of ``model``."""
    found: StandIns = {_shuffle_block_type(): _shuffle_block, _maxvit_types()[1]: _pass_through}
    for module in model.modules():
        if _is_ghost(module) and not hasattr(module, "short_conv"):
            found[type(module)] = _ghost_module
        elif _is_partial_residual(module):
            found[type(module)] = _partial_residual
    return found


def _shuffled(block: nn.Module) -> Frozen:
    frozen: Frozen = set()
    for branch in (block.branch1, block.branch2):
        layers = list(branch)
        convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
        if not convs:
            continue
        frozen.add((layers[convs[-1]], True))
        frozen.update((m, None) for m in layers[convs[-1] + 1].modules())  # the tail's norm (and its gate)
    if block.stride == 1:  # half of the input passes through to the shuffled output
        frozen.add((block.branch2[0], False))
    return frozen


def _is_ghost(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("primary_conv", "cheap_operation", "out_chs"))


def _is_csp(module: nn.Module) -> bool:
    """timm's cross-stage-partial stages: they split their expanded channels in two halves."""
    return all(hasattr(module, a) for a in ("conv_exp", "expand_chs")) and isinstance(module.expand_chs, int)


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _ghost_width(module: nn.Module) -> int:
    return _first_conv(module.primary_conv).out_channels + _first_conv(module.cheap_operation).out_channels


def frozen_channels(model: nn.Module) -> Frozen:
    """Every (module, direction) of ``model`` that a cut must leave alone (see the module doc)."""
    frozen: Frozen = set()
    shuffle, (mbconv, _) = _shuffle_block_type(), _maxvit_types()
    for module in model.modules():
        if isinstance(module, shuffle):
            frozen |= _shuffled(module)
        elif isinstance(module, mbconv):  # the residual stream the attention layers share
            frozen.update((m, None) for m in [*module.layers.pre_norm.modules(), *module.proj.modules()])
            frozen.update({(_first_conv(module.layers.conv_a), False), (module.layers.conv_c, True)})
        elif _is_ghost(module) and module.out_chs < _ghost_width(module):
            frozen.add((_first_conv(module.primary_conv), True))
        elif _is_csp(module):
            frozen.add((_first_conv(module.conv_exp), True))
        elif _is_partial_residual(module):
            frozen.add((_first_conv(module.conv_pwl), True))
            if module.use_shortcut:
                entry = module.conv_exp if module.conv_exp is not None else module.conv_dw
                frozen.add((_first_conv(entry), False))
        elif _is_ghost(getattr(module, "ghost2", None)) and hasattr(module, "shortcut"):
            # a Ghost bottleneck adds its input to ghost2's output: each residual channel is tied to
            # another one of the same tensor (primary j and its cheap copy), a loop torch-pruning cannot cut
            frozen.add((_first_conv(module.ghost2.primary_conv), True))
    return frozen


def touches_frozen(group: tp.Group, graph: tp.DependencyGraph, frozen: Frozen) -> bool:
    for item in group:
        module = item.dep.target.module
        if (module, None) in frozen or (module, graph.is_out_channel_pruning_fn(item.dep.handler)) in frozen:
            return True
    return False


def tied_copies(model: nn.Module) -> dict[nn.Module, tuple[int, int]]:
    """Layers whose output is read as equal parts: layer -> (parts, channels per part). A group
    laid out like that output must cut the same positions in every part, which torch-pruning
    does not know (see ``planning.channel_groups``): a Ghost module's [primary | cheap copy],
    keyed by the primary conv."""
    tied = {}
    for module in model.modules():
        if _is_ghost(module) and module.out_chs >= _ghost_width(module):
            primary = _first_conv(module.primary_conv)
            tied[primary] = (_ghost_width(module) // primary.out_channels, primary.out_channels)
    return tied


def sync_widths(model: nn.Module) -> None:
    """Set the widths blocks store for their forward to what a cut left (Ghost ``out_chs``)."""
    for module in model.modules():
        if _is_ghost(module):
            module.out_chs = min(module.out_chs, _ghost_width(module))
