"""torch-pruning's group-sparsity regularizer (DepGraph's sparse learning, ``group_sl``) on the
groups nam-prune prunes.

``tp.pruner.GroupNormPruner.regularize`` adds, after each backward pass, ``reg * w * gamma`` to
the gradient of every weight of every coupled group, with ``gamma`` growing from 1 for a group's
strongest channels to ``alpha`` (16) for its weakest: the weak channels' whole groups shrink
together. :class:`GroupSparsity` is that pruner, traced as :func:`~nam_prune.prune.graph.build_graph`
traces, with its groups replaced by :func:`~nam_prune.prune.planning.prunable_groups`: the head,
``prune.ignore`` and a family's protected parts are left alone exactly as the cut leaves them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

from nam_prune.prune.graph import Protected, pixel_parameters, tracing
from nam_prune.prune.planning import PruneConfig, prunable_groups


class GroupSparsity(tp.pruner.GroupNormPruner):
    """Called with the model after each backward pass (``fit``'s ``after_backward``), it adds
    torch-pruning's group-sparsity gradient at strength ``reg``; ``importance`` ranks channels
    within a group for the regularizer's ``gamma`` (only its order matters there). Built once per
    trained model, before training: the groups are fixed while the model's shapes are."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        config: PruneConfig,
        protected: Protected | None,
        reg: float,
        importance: tp.importance.Importance,
    ) -> None:
        self.config, self.protected = config, protected or Protected()
        with tracing(model, self.protected.stand_ins):
            super().__init__(
                model, example_input.clone(), importance, reg=reg,
                ignored_layers=pixel_parameters(model), root_module_types=[nn.Conv2d, nn.Linear],
            )
        self.update_regularizer()

    def update_regularizer(self) -> None:
        """The groups the cut may change (torch-pruning's own pick ignores nam-prune's protections)."""
        self._groups = list(prunable_groups(self.model, self.DG, self.config, self.protected))

    def __call__(self, model: nn.Module) -> None:
        self.regularize(model)
