"""Does a NAM score that reads the gate's response rank better than its |gamma|? Re-cuts a compare's trained NAM models.

``nam-prune compare`` ranks NAM's channels by the gate's normalized |gamma|. This benchmark cuts the
same trained NAM models (the ``trained_nam_seed*.pt`` a compare folder caches: same training, same
seeds) with other scores, through compare's own arms (same budgets, recalibration and fine-tune):

* ``nam_std``: the standard deviation of the gate's output over its own input distribution
  (``gates.gate_response``), raw across layers. The cut replaces a channel by nothing and
  recalibration restores the next BN's mean, so what a channel carries is its output's spread;
  this reads the host BN's scale and shift and the gate's sigmoid as well as its |gamma|.
* ``nam_std_mean``: the same divided by its layer's mean, as ``prune.normalizer: mean`` does |gamma|.
* ``nam_raw``: |gamma| without the layer normalization (``prune.normalizer: none``).
* ``nam_again``: compare's own NAM ranking, re-run: the check that an arm reproduces.

    python -m benchmarks nam_scoring RECIPE [OVERRIDES ...] --from runs/compare-X --output runs/scoring-X
        [--scores nam_std,nam_std_mean,nam_raw] [--macs-keep 0.5,0.3] [--seeds 0,1,2] [--threads N] [--json NAME.json]

``RECIPE`` and ``OVERRIDES`` (right after it) must be the compare's; ``--from``'s ``compare.json`` and NAM caches are
copied into ``--output``, so its other criteria stand beside the new scores for the paired differences.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.timing import add_options, benchmark_parser, parse, write_result
from nam_prune import compare as compare_module
from nam_prune.errors import NamPruneError
from nam_prune.gates import NAMChannelGate, gate_response
from nam_prune.prune.importance import NAMImportance
from nam_prune.prune.planning import PruneConfig
from nam_prune.recipe import load_recipe


class GateSpreadImportance(NAMImportance):
    """NAM's grouping, with each gate's channels scored by the spread of the gate's output."""

    def __init__(self, model: nn.Module, normalizer: str, fallback: str) -> None:
        super().__init__(model, normalizer, fallback)
        self.spread = {}
        for gate in (m for m in model.modules() if isinstance(m, NAMChannelGate)):
            _, out, weights = gate_response(gate)
            variance = (out.square() @ weights - (out @ weights).square()).clamp_min(0)
            self.spread[gate.bn] = variance.sqrt().float().cpu()

    def magnitude(self, norm: nn.BatchNorm2d, is_gate: bool) -> torch.Tensor:
        return self.spread[norm] if is_gate else super().magnitude(norm, is_gate)


SCORES: dict[str, Callable[[nn.Module, PruneConfig], NAMImportance]] = {
    "nam_std": lambda model, prune: GateSpreadImportance(model, "none", prune.fallback),
    "nam_std_mean": lambda model, prune: GateSpreadImportance(model, "mean", prune.fallback),
    "nam_raw": lambda model, prune: NAMImportance(model, "none", prune.fallback),
    "nam_again": lambda model, prune: NAMImportance(model, prune.normalizer, prune.fallback),
}
"""Each score from the model and the recipe's ``prune`` section (``nam_again`` is compare's ``nam``)."""


@contextlib.contextmanager
def scores_as_criteria(names: list[str]) -> Iterator[None]:
    """Within the block, ``compare`` knows ``names`` as criteria that train as ``nam`` (so they load its
    cached models) and rank with their ``SCORES``."""
    saved = compare_module.CRITERIA, compare_module._training, compare_module._importance
    criteria, training, importance = saved
    compare_module.CRITERIA = (*criteria, *names)
    compare_module._training = lambda criterion, recipe: training("nam" if criterion in names else criterion, recipe)
    compare_module._importance = lambda criterion, model, recipe, seed: (
        SCORES[criterion](model, recipe.prune) if criterion in names else importance(criterion, model, recipe, seed)
    )
    try:
        yield
    finally:
        compare_module.CRITERIA, compare_module._training, compare_module._importance = saved


def main(argv: Sequence[str] | None = None) -> None:
    parser = benchmark_parser("nam_scoring", __doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--from", dest="source", type=Path, required=True, help="the compare folder with trained_nam_seed*.pt")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--scores", default="nam_std,nam_std_mean,nam_raw")
    parser.add_argument("--macs-keep", default="0.5,0.3")
    parser.add_argument("--seeds", default="0,1,2")
    add_options(parser)
    args = parse(parser, argv)
    names = args.scores.split(",")
    unknown = sorted(set(names) - set(SCORES))
    if unknown:
        parser.error(f"unknown scores {', '.join(unknown)}; choose from {', '.join(SCORES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        keeps = [float(k) for k in args.macs_keep.split(",")]
    except ValueError:
        parser.error("--seeds takes integers and --macs-keep numbers, comma-separated")
    try:
        recipe = load_recipe(args.recipe, tuple(args.overrides))
    except NamPruneError as error:
        parser.error(str(error))
    caches = [args.source / f"trained_nam_seed{seed}.pt" for seed in seeds]
    missing = [str(path) for path in [args.source / "compare.json", *caches] if not path.is_file()]
    if missing:
        parser.error(f"--from lacks {', '.join(missing)}: run nam-prune compare with --criteria nam and these seeds first")
    args.output.mkdir(parents=True, exist_ok=True)
    for path in [args.source / "compare.json", *caches]:
        if not (args.output / path.name).exists():
            shutil.copy2(path, args.output / path.name)
    with scores_as_criteria(names):
        state = compare_module.compare(recipe, names, keeps, seeds, args.output)
        criteria = sorted({a["criterion"] for a in state["arms"]} - {"dense"}, key=lambda c: (c not in names, c))
        state["summary"] = compare_module.summarize(state["arms"], criteria, keeps, seeds)
    compare_module.print_summary(state)
    if args.json:
        write_result(args.json, parser, argv, source=str(args.source), scores=names, macs_keep=keeps, seeds=seeds, arms=state["arms"],
                     summary=state["summary"])
