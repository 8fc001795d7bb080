"""nam-prune: compress convolutional networks with NAM (normalization-based attention) pruning.

The pipeline, one module per stage::

    data -> models -> surgery (insert_nam) -> train (+ sparsity penalty)
         -> prune (NAMImportance + torch-pruning) -> train (fine-tune) -> report / checkpoint
"""

__version__ = "0.1.0"

from nam_prune.checkpoint import load, save_checkpoint
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, NAMGated, NAMSpatialGate
from nam_prune.models import ModelSpec, build_model
from nam_prune.pipeline import run
from nam_prune.prune import NAMImportance, PruneConfig, prune_model
from nam_prune.recipe import Recipe, load_recipe
from nam_prune.sparsity import apply_sparsity_penalty, gamma_stats
from nam_prune.surgery import NAMConfig, insert_nam
from nam_prune.train import TrainConfig, evaluate, fit

__all__ = [
    "NAMChannelGate",
    "NAMConfig",
    "NAMGated",
    "NAMImportance",
    "NAMSpatialGate",
    "ModelSpec",
    "NamPruneError",
    "PruneConfig",
    "Recipe",
    "TrainConfig",
    "apply_sparsity_penalty",
    "build_model",
    "evaluate",
    "fit",
    "gamma_stats",
    "insert_nam",
    "load",
    "load_recipe",
    "prune_model",
    "run",
    "save_checkpoint",
]
