"""nam-prune: compress convolutional networks with NAM (normalization-based attention) pruning.

The pipeline, one module per stage (``pipeline.run`` drives them from a recipe)::

    data -> models (families) -> surgery: insert_nam -> train: fit (+ sparsity penalty)
         -> prune: prune_model (importance, graph, planning, schedule) -> train: fit (fine-tune)
         -> measure -> artifact: save / load -> report

Each stage has one public verb that takes a dataclass config, usable without the CLI.
"""

from nam_prune.artifact import ModelRecord, load, save
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMGated, NAMSpatialGate
from nam_prune.measure import Metrics, ReportConfig, measure
from nam_prune.models import ModelFamily, ModelSpec, build_model
from nam_prune.pipeline import run
from nam_prune.prune import NAMImportance, PruneConfig, PruneResult, prune_model
from nam_prune.recipe import Recipe, load_recipe
from nam_prune.sparsity import apply_sparsity_penalty, gamma_stats
from nam_prune.surgery import NAMConfig, insert_nam, strip_gates
from nam_prune.train import TrainConfig, evaluate, fit
from nam_prune.version import __version__

__all__ = [
    "Metrics",
    "ModelFamily",
    "ModelRecord",
    "ModelSpec",
    "NAMChannelGate",
    "NAMConfig",
    "NAMGated",
    "NAMImportance",
    "NAMSpatialGate",
    "NamPruneError",
    "PruneConfig",
    "PruneResult",
    "Recipe",
    "ReportConfig",
    "TrainConfig",
    "__version__",
    "apply_sparsity_penalty",
    "build_model",
    "evaluate",
    "fit",
    "gamma_stats",
    "insert_nam",
    "load",
    "load_recipe",
    "measure",
    "prune_model",
    "run",
    "save",
    "strip_gates",
]
