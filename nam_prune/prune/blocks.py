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
* timm's split-and-merge blocks, whose forward reshapes or splits a map into parts of equal or
  stored sizes, works on each part and merges them:

  - Split attention (ResNeSt) and selective kernels (SKNet) reshape their ``radix`` / path
    outputs into a new dimension that torch-pruning cannot map; they are traced through
    explicit splits and adds with the same layers (``_split_attention``, ``_selective_kernel``).
    A split-attention conv's output and its attention's are [part 1 | ... | part radix], a
    selective kernel's attention [path 1 | path 2 | ...]: a cut takes the same positions in every
    part (``tied_copies``). Where the attention mixes cardinal groups
    (cardinality > 1) the parts are not laid out that way, so the conv's and the attention's
    outputs stay. A selective kernel that splits its input among its paths keeps its input.
  - Res2Net splits its first conv's output into ``scale`` parts of a stored ``width``: a cut
    takes the same positions in every part and ``width`` follows it (``sync_widths``).
  - MixNet's mixed convs split their input at stored sizes: the sizes follow the cut.
  - DPN blocks slice a stored ``num_1x1_c`` residual width off their dense path: traced with
    explicit splits, the residual and dense channels stay (the projections and ``c1x1_c``
    outputs); the grouped bottleneck inside each block is cut.
"""

from __future__ import annotations

import functools
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


def _is_split_attention(module: nn.Module) -> bool:
    """timm's ``SplitAttn`` (ResNeSt) with more than one radix part."""
    return all(hasattr(module, a) for a in ("radix", "rsoftmax", "fc1", "fc2", "conv")) and module.radix > 1


def _is_selective_kernel(module: nn.Module) -> bool:
    """timm's ``SelectiveKernel`` (SKNet)."""
    return all(hasattr(module, a) for a in ("paths", "attn", "split_input", "num_paths"))


def _is_res2net(module: nn.Module) -> bool:
    """timm's ``Bottle2neck``: ``conv1``'s output split into ``scale`` parts of ``width`` channels."""
    return all(hasattr(module, a) for a in ("conv1", "convs", "bns", "width", "scale")) and module.scale > 1


def _is_mixed_conv(module: nn.Module) -> bool:
    """timm's ``MixedConv2d``: its input split at stored ``splits``, one conv per part."""
    return isinstance(module, nn.ModuleDict) and isinstance(getattr(module, "splits", None), list)


def _is_inception_mixer_block(module: nn.Module) -> bool:
    """timm's InceptionNeXt ``MetaNeXtBlock``: its token mixer splits the input at stored
    ``split_indexes`` into an identity part and three depthwise bands; its MLP reads the whole."""
    mixer = getattr(module, "token_mixer", None)
    return hasattr(mixer, "split_indexes") and all(hasattr(mixer, a) for a in ("dwconv_hw", "dwconv_w", "dwconv_h"))


def _is_fixed_width_blur(module: nn.Module) -> bool:
    """timm's ``BlurPool2d`` built for a channel count: one copy of its fixed filter per channel."""
    return all(hasattr(module, a) for a in ("filt", "filt_size", "channels")) and module.channels is not None


def _is_cross_covariance_attention(module: nn.Module) -> bool:
    """timm's XCiT ``XCA``: it splits ``qkv`` into heads of (token width / heads) channels, so the
    token width and ``qkv`` are tied by a reshape torch-pruning does not see."""
    return all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "temperature"))


def _is_head_split_attention(module: nn.Module) -> bool:
    """timm's LeViT attention: it splits its projections per head at stored ``key_dim`` /
    ``val_attn_dim`` widths and adds a learned per-head bias, none of which follows a cut."""
    return all(hasattr(module, a) for a in ("attention_biases", "num_heads", "key_dim", "val_attn_dim"))


def _is_dual_path(module: nn.Module) -> bool:
    """timm's DPN ``DualPathBlock``: a residual path of ``num_1x1_c`` channels beside a dense one."""
    return all(hasattr(module, a) for a in ("num_1x1_c", "c1x1_a", "c3x3_b", "c1x1_c"))


def _parts(x: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """``count`` equal parts of ``x``'s channels. torch-pruning maps a split's i-th reader to its
    i-th part, so each part must be read by exactly one op."""
    return torch.split(x, [x.shape[1] // count] * count, dim=1)


def _weighted_sum(parts: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """``sum_i part_i * attention_i`` with the attention's channels laid out [path 1 | path 2 | ...]:
    each position couples across the parts and the attention, as in the reshaped original (the
    softmax over parts is a sigmoid here: the same shapes and couplings, what tracing needs)."""
    weights = _parts(logits, len(parts))
    return functools.reduce(torch.add, [part * torch.sigmoid(w) for part, w in zip(parts, weights)])


def _split_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SplitAttn`` with its radix parts as explicit splits instead of a 5-d reshape."""
    x = module.act0(module.drop(module.bn0(module.conv(x))))
    parts = [part.clone() for part in _parts(x, module.radix)]  # one reader per part (see _parts)
    pooled = functools.reduce(torch.add, parts).mean((2, 3), keepdim=True)
    return _weighted_sum(parts, module.fc2(module.act1(module.bn1(module.fc1(pooled)))))


def _selective_kernel(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``SelectiveKernel`` with its paths added and weighted instead of stacked in a new dimension."""
    inputs = _parts(x, module.num_paths) if module.split_input else [x] * module.num_paths
    paths = [path(part) for path, part in zip(module.paths, inputs)]
    attn = module.attn
    pooled = functools.reduce(torch.add, paths).mean((2, 3), keepdim=True)
    return _weighted_sum(paths, attn.fc_select(attn.act(attn.bn(attn.fc_reduce(pooled)))))


def _dual_path(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``DualPathBlock`` with its slices at ``num_1x1_c`` as explicit splits (torch-pruning's slice
    handling fails on them)."""

    def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(t, [module.num_1x1_c, t.shape[1] - module.num_1x1_c], dim=1)

    projection = module.c1x1_w_s1 if module.c1x1_w_s1 is not None else module.c1x1_w_s2
    residual, dense = split(projection(x) if projection is not None else x)
    x = module.c1x1_c(module.c3x3_b(module.c1x1_a(x)))
    if module.c1x1_c1 is not None and module.c1x1_c2 is not None:
        out1, out2 = module.c1x1_c1(x), module.c1x1_c2(x)
    else:
        out1, out2 = split(x)
    return torch.cat([residual + out1, dense, out2], dim=1)


def _is_token_subsample(module: nn.Module) -> bool:
    """timm's LeViT ``Downsample``: tokens laid out (batch, height, width, channels), subsampled by slicing."""
    return all(hasattr(module, a) for a in ("resolution", "stride", "pool")) and not list(module.parameters())


def _token_subsample(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The same subsample with the channels in dim 1: torch-pruning reads a slice of a 4-d
    tensor's dim 1 as a channel slice (half the channels, for LeViT's stride 2)."""
    batch, _, channels = x.shape
    x = x.view(batch, *module.resolution, channels).permute(0, 3, 1, 2)
    x = module.pool(x) if module.pool is not None else x[:, :, :: module.stride, :: module.stride]
    return x.permute(0, 2, 3, 1).reshape(batch, -1, channels)


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
        elif _is_split_attention(module):
            found[type(module)] = _split_attention
        elif _is_selective_kernel(module):
            found[type(module)] = _selective_kernel
        elif _is_dual_path(module):
            found[type(module)] = _dual_path
        elif _is_token_subsample(module):
            found[type(module)] = _token_subsample
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


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _ghost_width(module: nn.Module) -> int:
    return _first_conv(module.primary_conv).out_channels + _first_conv(module.cheap_operation).out_channels


def kept_whole(model: nn.Module) -> dict[str, list[tuple[nn.Module, Frozen]]]:
    """What a cut must leave alone, by kind of block: kind -> [(block, its (module, direction)
    pairs)] (see the module doc). Runs and the check report the kinds and how many blocks each."""
    found: dict[str, list[tuple[nn.Module, Frozen]]] = {}

    def keep(kind: str, block: nn.Module, pairs: Frozen) -> None:
        found.setdefault(kind, []).append((block, pairs))

    shuffle, (mbconv, _) = _shuffle_block_type(), _maxvit_types()
    for module in model.modules():
        if isinstance(module, shuffle):
            keep("ShuffleNet: shuffled block outputs", module, _shuffled(module))
        elif isinstance(module, mbconv):  # the residual stream the attention layers share
            pairs = {(m, None) for m in [*module.layers.pre_norm.modules(), *module.proj.modules()]}
            keep("MaxViT: attention stream", module, pairs | {(_first_conv(module.layers.conv_a), False), (module.layers.conv_c, True)})
        elif _is_ghost(module) and module.out_chs < _ghost_width(module):
            keep("Ghost: sliced module outputs", module, {(_first_conv(module.primary_conv), True)})
        elif _is_csp(module):
            keep("CSP: split expansions", module, {(_first_conv(module.conv_exp), True)})
        elif _is_partial_residual(module):
            pairs = {(_first_conv(module.conv_pwl), True)}
            if module.use_shortcut:
                entry = module.conv_exp if module.conv_exp is not None else module.conv_dw
                pairs.add((_first_conv(entry), False))
            keep("ReXNet: partial-residual inputs and outputs", module, pairs)
        elif _is_split_attention(module) and module.rsoftmax.cardinality > 1:
            keep("split attention (cardinality > 1): radix outputs", module, {(module.conv, True), (module.fc2, True)})
        elif _is_selective_kernel(module) and module.split_input:
            keep("selective kernel: split inputs", module, {(_first_conv(path), False) for path in module.paths})
        elif _is_cross_covariance_attention(module):
            keep("XCiT: attention and token width", module, {(module.qkv, None), (module.proj, None)})
        elif _is_head_split_attention(module):  # the token width outside the heads still follows cuts
            *projections, output = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            pairs = {(layer, True) for layer in projections} | {(output, False), (module.attention_biases, None)}
            keep("LeViT: attention heads", module, pairs)
        elif _is_dual_path(module):  # in DPN-b blocks c1x1_c is a BN alone and c1x1_c1/c2 make the two paths
            ends = [module.c1x1_c, module.c1x1_c1, module.c1x1_c2, module.c1x1_w_s1, module.c1x1_w_s2]
            convs = [_first_conv(end) for end in ends if end is not None and _has_conv(end)]
            keep("DPN: residual and dense paths", module, {(conv, True) for conv in convs})
        elif _is_ghost(getattr(module, "ghost2", None)) and hasattr(module, "shortcut"):
            # a Ghost bottleneck adds its input to ghost2's output: each residual channel is tied to
            # another one of the same tensor (primary j and its cheap copy), a loop torch-pruning cannot cut
            keep("Ghost bottleneck: residual outputs", module, {(_first_conv(module.ghost2.primary_conv), True)})
    return found


def kept_whole_counts(model: nn.Module) -> dict[str, int]:
    """Kind of block kept whole (in part) -> how many such blocks ``model`` has."""
    return {kind: len(found) for kind, found in kept_whole(model).items()}


def frozen_channels(model: nn.Module) -> Frozen:
    """Every (module, direction) of ``model`` that a cut must leave alone."""
    return {pair for found in kept_whole(model).values() for _, pairs in found for pair in pairs}


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
    keyed by the primary conv; the radix parts of a split-attention conv and its attention, the
    path parts of a selective kernel's attention; a Res2Net ``conv1``'s scale parts."""
    tied = {}
    for module in model.modules():
        if _is_ghost(module) and module.out_chs >= _ghost_width(module):
            primary = _first_conv(module.primary_conv)
            tied[primary] = (_ghost_width(module) // primary.out_channels, primary.out_channels)
        elif _is_split_attention(module) and module.rsoftmax.cardinality == 1:
            for layer in (module.conv, module.fc2):
                tied[layer] = (module.radix, layer.out_channels // module.radix)
        elif _is_selective_kernel(module):
            select = module.attn.fc_select
            tied[select] = (module.num_paths, select.out_channels // module.num_paths)
        elif _is_res2net(module):
            tied[module.conv1] = (module.scale, module.width)
    return tied


def sync_widths(model: nn.Module) -> None:
    """Set the widths blocks store for their forward to what a cut left (Ghost ``out_chs``,
    Res2Net ``width``, mixed-conv ``splits``, InceptionNeXt ``split_indexes``); a blur pool's
    per-channel copies of one filter become that filter spread over whatever width comes in."""
    for module in model.modules():
        if _is_ghost(module):
            module.out_chs = min(module.out_chs, _ghost_width(module))
        elif _is_res2net(module):
            module.width = module.convs[0].in_channels
        elif _is_mixed_conv(module):
            module.splits = [conv.in_channels for conv in module.values()]
            module.in_channels = sum(module.splits)
            module.out_channels = sum(conv.out_channels for conv in module.values())
        elif _is_inception_mixer_block(module):
            mixer = module.token_mixer
            bands = [mixer.dwconv_hw.in_channels, mixer.dwconv_w.in_channels, mixer.dwconv_h.in_channels]
            mixer.split_indexes = (_first_conv(module.mlp).in_channels - sum(bands), *bands)
        elif _is_fixed_width_blur(module):
            module.channels, module.filt = None, module.filt[:1]
