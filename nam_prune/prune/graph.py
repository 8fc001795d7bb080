"""Stage 4a: torch-pruning's dependency graph of a gated model, what it must leave alone,
counting, and replaying a recorded pruning (how checkpoints are rebuilt)."""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMSpatialGate, tracing_mode
from nam_prune.prune import blocks

# torch-pruning warns each time its shape inference gives up on a deep branch (YOLO heads, timm attention); it
# then maps no index through it; the model checks after a cut catch a wrong map, the warning gives a user nothing to act on
warnings.filterwarnings("ignore", message="Maximum recursive depth reached", module=r"torch_pruning\.")

LayerCuts = list[tuple[str, bool, list[int]]]
"""One pruning step: (layer name, output channels?, channels removed), each layer and side once."""
PruningHistory = list[LayerCuts]
"""Every step's cuts in order, each in the numbering of the model as that step found it."""
StandIns = blocks.StandIns
"""Block types traced through a simpler forward with the same convs and shapes (torch-pruning
cannot map the reshapes inside YOLO attention blocks). Such blocks must also be kept intact
(``IntactBlock``), since the stand-in hides their real coupling."""


@dataclass
class IntactBlock:
    """A block whose inner channels must not change (attention heads, a detection head).

    Only the input channels of its ``entries`` (the convs fed from outside) may follow
    the layer that feeds the block; any other cut that reaches inside it is skipped.
    """

    name: str
    module: nn.Module
    entries: list[nn.Module]
    members: set[nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.members = set(self.module.modules())  # looked up for every candidate group


@dataclass
class Protected:
    """What a model family keeps: ``layers`` are never pruning roots, ``blocks`` stay intact,
    ``stand_ins`` trace blocks torch-pruning cannot follow."""

    layers: list[nn.Module] = field(default_factory=list)
    blocks: list[IntactBlock] = field(default_factory=list)
    stand_ins: StandIns = field(default_factory=dict)


def reaches_into(group: tp.Group, graph: tp.DependencyGraph, blocks: list[IntactBlock]) -> str | None:
    """The name of the first intact block this group would change inside, if any."""
    for block in blocks:
        for item in group:
            module = item.dep.target.module
            if module not in block.members:
                continue
            if module in block.entries and not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            return block.name
    return None


def head_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier head (the last Linear or Conv2d registered): never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1:]


@contextlib.contextmanager
def _stand_ins(model: nn.Module, stand_ins: StandIns):
    swapped = [m for m in model.modules() if type(m) in stand_ins]
    for module in swapped:
        module.forward = functools.partial(stand_ins[type(module)], module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


@contextlib.contextmanager
def _explicit_splits():
    """Run ``split(size)`` and ``chunk`` as ``split`` with an explicit size list while tracing:
    the values are the same, and torch-pruning maps only that form right (for the others it
    computes offsets past the end: CSPNet stages, ShuffleNet's halves)."""
    split, chunk, function_chunk = torch.Tensor.split, torch.Tensor.chunk, torch.chunk

    def split_with_sizes(tensor: torch.Tensor, size, dim: int = 0):
        if isinstance(size, int):
            total = tensor.shape[dim]
            size = [min(size, total - start) for start in range(0, total, size)]
        return split(tensor, size, dim)

    def chunk_with_sizes(tensor: torch.Tensor, chunks: int, dim: int = 0):
        return split_with_sizes(tensor, -(-tensor.shape[dim] // chunks), dim)

    torch.Tensor.split, torch.Tensor.chunk, torch.chunk = split_with_sizes, chunk_with_sizes, chunk_with_sizes
    try:
        yield
    finally:
        torch.Tensor.split, torch.Tensor.chunk, torch.chunk = split, chunk, function_chunk


@contextlib.contextmanager
def _vector_broadcasts():
    """Run a vector reshaped to broadcast over a feature map (``gamma.reshape(1, -1, 1, 1)``,
    a layer scale) as unsqueezes while tracing: torch-pruning maps a reshape by comparing the
    widths it infers on either side, gets the block's hidden width on the far side, and maps the
    scale's channel i to 4i..4i+3 (InceptionNeXt); an unsqueeze keeps channel i as i."""
    reshape, view = torch.Tensor.reshape, torch.Tensor.view

    def broadcast_as_unsqueezes(original):
        def reshaped(tensor: torch.Tensor, *shape):
            shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
            wide = [d for d, size in enumerate(shape) if size != 1]
            if tensor.dim() != 1 or len(wide) != 1 or shape[wide[0]] not in (-1, tensor.shape[0]):
                return original(tensor, *shape)
            for _ in range(wide[0]):
                tensor = tensor.unsqueeze(0)
            for _ in range(len(shape) - wide[0] - 1):
                tensor = tensor.unsqueeze(-1)
            return tensor

        return reshaped

    torch.Tensor.reshape, torch.Tensor.view = broadcast_as_unsqueezes(reshape), broadcast_as_unsqueezes(view)
    try:
        yield
    finally:
        torch.Tensor.reshape, torch.Tensor.view = reshape, view


@contextlib.contextmanager
def tracing(model: nn.Module, stand_ins: StandIns | None = None):
    """What torch-pruning traces ``model`` under: eval mode, the gates in ``tracing_mode``, the
    family's and the sealed blocks' stand-ins, explicit splits, autograd on even when the caller
    is under no_grad / inference_mode. :func:`build_graph` traces in it, and so does anything
    else that builds torch-pruning's graph of a model (a torch-pruning pruner), so both see the
    same groups. A failed trace is one ``NamPruneError``."""
    stand_ins = {**blocks.stand_ins(model), **(stand_ins or {})}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), tracing_mode(model), torch.inference_mode(False), torch.enable_grad():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            with _stand_ins(model, stand_ins), _explicit_splits(), _vector_broadcasts():
                yield
    except NamPruneError:
        raise
    except Exception as error:  # torch-pruning raises many types while tracing
        raise NamPruneError(
            f"torch-pruning could not trace the model ({type(error).__name__}: {error}); "
            "the forward must run on one tensor input; list untraceable blocks in prune.ignore"
        ) from error
    finally:
        model.train(was_training)


def pixel_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Spatial gates' parameters: indexed by pixel, not channel, so never pruned."""
    return [p for m in model.modules() if isinstance(m, NAMSpatialGate) for p in m.parameters()]


def _split_output_index(split: tp.dependency.Node, consumer: tp.dependency.Node) -> int | None:
    """Which output of ``split`` feeds ``consumer``, from autograd's edges (``next_functions``
    pairs each input with its producer's output number): the outputs found nearest ``consumer``,
    so a concat that takes one part as is and others through convs reads the part it takes
    directly (InceptionNeXt's identity branch); ``None`` if not exactly one."""
    seen, frontier = set(), [consumer.grad_fn]
    while frontier and len(seen) < 64:
        found, next_frontier = set(), []
        for fn in frontier:
            for producer, output in getattr(fn, "next_functions", ()):
                if producer is split.grad_fn:
                    found.add(output)
                elif producer is not None and producer not in seen:
                    seen.add(producer)
                    next_frontier.append(producer)
        if found:
            return found.pop() if len(found) == 1 else None
        frontier = next_frontier
    return None


def _order_split_outputs(graph: tp.DependencyGraph) -> None:
    """Put each split's consumers in the order of the parts they read, then redo torch-pruning's
    channel bookkeeping. torch-pruning maps part i to the i-th consumer its trace happened to
    meet, which is often the reverse order (MixNet's mixed convs, any ``torch.split`` whose parts
    feed different layers): cuts then land in the wrong part."""
    reordered = False
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or len(node.outputs) < 2:
            continue
        index = [_split_output_index(node, consumer) for consumer in node.outputs]
        if None in index or len(set(index)) != len(index) or index == sorted(index):
            continue
        node.outputs = [consumer for _, consumer in sorted(zip(index, node.outputs), key=lambda pair: pair[0])]
        reordered = True
    if reordered:
        tp.dependency.shape_infer.init_shape_information(graph)
        tp.dependency.index_mapping.update_index_mapping(graph)


def build_graph(model: nn.Module, example_input: torch.Tensor, stand_ins: StandIns | None = None) -> tp.DependencyGraph:
    """torch-pruning's dependency graph, traced :func:`tracing` ``model``, splits mapped in order.

    Spatial gates are traced as identities: their parameters are indexed by pixel, not
    channel, and their reductions over channels confuse torch-pruning's reshape inference
    (it mis-maps the final flatten). They couple no channels, so the graph stays exact.
    """
    with tracing(model, stand_ins):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input.clone(), ignored_params=pixel_parameters(model)
        )
    _order_split_outputs(graph)
    return graph


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """MACs and parameters from torch-pruning's counter (gate norms counted as the BNs they are)."""
    with tracing_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv and linear layer, by name: the per-layer table's raw data."""
    return {
        name: m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def layer_names(model: nn.Module) -> dict[nn.Module | nn.Parameter, str]:
    """The name of every module and parameter: a group's members are modules, or bare parameters
    (layer scales, which torch-pruning finds as "unwrapped parameters") that follow its cut."""
    return {**{m: n for n, m in model.named_modules()}, **{p: n for n, p in model.named_parameters()}}


def _cut_parameter(model: nn.Module, name: str, channels: list[int]) -> None:
    """Cut a bare parameter along the dim torch-pruning prunes it on: its last one wider than 1."""
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    parameter = getattr(owner, attribute)
    dims = [d for d, size in enumerate(parameter.shape) if size > 1]
    if not dims or len(channels) >= parameter.shape[dims[-1]]:
        raise NamPruneError(f"pruning would empty {name}; lower prune.max_pruning_ratio")
    setattr(owner, attribute, tp.pruner.function.ParameterPruner(dims[-1]).prune_out_channels(parameter, channels))


def cut_layers(model: nn.Module, cuts: LayerCuts) -> None:
    """Make one step's ``cuts`` (from ``planning.layer_cuts``) with torch-pruning's layer pruners.

    Every layer is cut by its own channel list, all read off one trace of the model. Cutting the
    groups one after another through the graph instead leaves torch-pruning's concat and split
    offsets at their traced values while earlier groups change the widths behind them, so a
    later group's channels land in the wrong part (MixNet's mixed convs). Each layer's pruner is
    chosen before any cut: a grouped conv cut to one channel per group looks depthwise afterwards.
    """
    modules = dict(model.named_modules())
    registry = tp.DependencyGraph()  # only its pruner registry: which function cuts which layer type
    pruners = {name: registry.get_pruner_of_module(modules[name]) for name, _, _ in cuts if name in modules}
    for name, out, channels in cuts:
        if name not in modules:
            _cut_parameter(model, name, channels)
            continue
        module, pruner = modules[name], pruners[name]
        width = pruner.get_out_channels(module) if out else pruner.get_in_channels(module)
        if width is not None and len(channels) >= width:
            raise NamPruneError(f"pruning would empty {name}; lower prune.max_pruning_ratio")
        (pruner.prune_out_channels if out else pruner.prune_in_channels)(module, channels)
    blocks.sync_widths(model)


def replay(
    model: nn.Module,
    example_input: torch.Tensor,
    history: PruningHistory,
    stand_ins: StandIns | None = None,
    by_layer: bool = True,
) -> nn.Module:
    """Redo a recorded pruning on a freshly built dense model (how checkpoints are rebuilt): each
    step's per-layer cuts (:func:`cut_layers`), or, ``by_layer=False`` for files of format 2 and
    older, torch-pruning's history of group roots (one flat step) replayed through the graph."""
    if by_layer:
        for step in history:
            cut_layers(model, step)
        return model
    graph = build_graph(model, example_input, stand_ins)
    graph.load_pruning_history([[name, out, list(idxs)] for step in history for name, out, idxs in step])
    blocks.sync_widths(model)
    return model
