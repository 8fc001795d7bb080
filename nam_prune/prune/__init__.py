"""Stages 3-4: rank channels by the NAM gates and remove them structurally with torch-pruning.

Laid out as Torch-Pruning separates its parts: ``importance`` (NAM's ranking), ``graph``
(tracing, protected blocks, counting, replay), ``planning`` (scoring, budget allocation,
bisection to a MAC target, apply) and ``schedule`` (the ``prune_model`` verb, in steps).
"""

from nam_prune.prune.blocks import kept_whole_counts
from nam_prune.prune.graph import (
    IntactBlock,
    Protected,
    PruningHistory,
    build_graph,
    channel_counts,
    count_macs_params,
    replay,
)
from nam_prune.prune.group_sparsity import GroupSparsity
from nam_prune.prune.importance import NAMImportance, normalize_scores
from nam_prune.prune.planning import PruneConfig
from nam_prune.prune.schedule import PruneResult, channel_step_fraction, check_macs_keeps, check_prunable, prune_model

__all__ = [
    "GroupSparsity",
    "IntactBlock",
    "NAMImportance",
    "Protected",
    "PruneConfig",
    "PruneResult",
    "PruningHistory",
    "build_graph",
    "channel_counts",
    "check_macs_keeps",
    "check_prunable",
    "channel_step_fraction",
    "count_macs_params",
    "kept_whole_counts",
    "normalize_scores",
    "prune_model",
    "replay",
]
