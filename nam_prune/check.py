"""Can nam-prune compress this architecture? ``nam-prune check NAME`` answers before any training.

It inserts NAM gates, cuts the model to a MAC target in global and local scope, runs it,
and saves and reloads it weights-only, requiring identical outputs. Weights are random and
the BN scales drawn at random too (seeded), so the ranking is as uneven as a trained
model's rather than all ties. The table of covered architectures (docs/architectures.md) is this
check run over torchvision's models and timm's BN families:
``nam-prune check --sweep --json docs/model_sweep.json --markdown docs/model_sweep.md``.
"""

from __future__ import annotations

import concurrent.futures
import copy
import importlib.util
import multiprocessing
import os
import tempfile
import time
import warnings
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torchvision

from nam_prune.artifact import ModelRecord, load, save
from nam_prune.errors import NamPruneError, first_line
from nam_prune.models import ModelSpec, build_model, check_input, forward_error, smallest_size_above
from nam_prune.prune import PruneConfig, kept_whole_counts, prune_model
from nam_prune.prune.graph import count_macs_params
from nam_prune.surgery import NAMConfig, insert_nam, require_batchnorm

Scope = Literal["global", "local"]
INTERNAL_ERROR = "internal error (a nam-prune bug, please report it)"

SMALLEST_SIZE = {"inception_v3": 75, "maxvit_t": 224}
"""Sweep input sizes where 64 px is too small (what ``check_input`` names)."""
LEAST_MACS_KEEP = {"maxvit_t": 0.7}
"""Where half the MACs is out of reach: MaxViT's attention stream stays whole (prune/blocks.py), so
its deepest cut keeps more than half (its row in docs/model_sweep.md)."""
TOO_BIG = frozenset({"regnet_y_128gf", "vit_h_14"})  # 0.6B parameters: left out of the sweep
TIMM_SWEEP = (
    "resnet18d",  # ResNet-D (average-pool shortcut)
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "ghostnet_100",  # Ghost modules: a cheap depthwise copy concatenated, sliced to a stored width
    "regnetx_002",
    "regnety_002",
    "rexnet_100",  # partial residuals (a sliced add)
    "dla34",  # tree aggregation
    "cspresnet50",  # cross-stage-partial splits
    "cspdarknet53",
    "cs3darknet_s",
    "resnext26ts",
    "hrnet_w18_small",  # parallel resolutions fused
    "resnest14d",  # split attention: radix parts reshaped into a new dimension
    "tf_mixnet_s",  # mixed kernels: the input split at stored sizes
    "skresnet18",  # selective kernels: paths stacked and weighted
    "res2net50_14w_8s",  # multi-scale splits at a stored width, chained by adds
    "dpn68",  # dual paths: a residual width sliced off a dense path
    "res2next50",  # multi-scale splits of grouped convs: conv groups in every part
    "inception_next_atto",  # an identity part and three bands split at stored sizes; layer scales
    "swiftformer_xs",  # layer scales: bare parameters that follow the cut
    "tresnet_m",  # blur pools with one filter copy per channel
)


SweepSet = Literal["all", "torchvision", "timm"]


def timm_bn_families() -> dict[str, str]:
    """timm family (the registry's module of model definitions) -> its smallest model with BatchNorm.

    Models are built on the meta device (no weights made, about 3 minutes for timm's whole
    registry on 2 cores) to count parameters; timm's reduced ``test_*`` models are taken only
    where a family has nothing else. Families whose models have no BatchNorm2d are left out:
    NAM ranks channels by BN scales.
    """
    import timm

    chosen: dict[str, str] = {}
    for family in timm.list_modules():
        candidates = []
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
            except Exception:  # a registry entry that cannot be built without downloads or extras
                continue
            if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                candidates.append((name.startswith("test_"), sum(p.numel() for p in model.parameters()), name))
        if candidates:
            chosen[family] = min(candidates)[2]
    return chosen


def sweep_names(which: SweepSet = "all") -> list[tuple[str, str]]:
    """(family, model name) pairs: every torchvision classification model but the two largest,
    then (when timm is installed) the timm models chosen for a hard structure (``TIMM_SWEEP``)
    and one model per timm BN family (:func:`timm_bn_families`): the table of covered
    architectures (docs/model_sweep.md)."""
    names = []
    if which in ("all", "torchvision"):
        names += [("torchvision", n) for n in torchvision.models.list_models(torchvision.models) if n not in TOO_BIG]
    if which in ("all", "timm") and importlib.util.find_spec("timm") is not None:
        families = timm_bn_families()
        names += [("timm", f"timm:{n}") for n in TIMM_SWEEP if n not in families.values()]
        names += [(f"timm {family}", f"timm:{n}") for family, n in families.items()]
    return names


@dataclass
class CheckResult:
    """What one architecture gave: MACs and params before and after each scope's cut, the
    largest output difference after a reload, and ``ok`` or the one-line reason it stopped."""

    model: str
    image_size: int
    family: str = ""
    status: str = "ok"
    macs_before: int = 0
    params_before: int = 0
    macs_after: dict[str, int] = field(default_factory=dict)
    params_after: dict[str, int] = field(default_factory=dict)
    reload_max_abs_diff: float = 0.0
    kept_whole: dict[str, int] = field(default_factory=dict)
    """Blocks whose split or shared channels the cut leaves (kind -> count), ``prune.blocks.kept_whole``."""
    seconds: float = 0.0


def _randomize_scales(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 0.95 + 0.05)


def _reload_difference(model: nn.Module, record: ModelRecord, inputs: torch.Tensor) -> float:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        save(path, model, record)
        reloaded = load(path)
    with torch.no_grad():
        return float((reloaded(inputs) - model(inputs)).abs().max())


def check_model(
    name: str,
    image_size: int = 64,
    macs_keep: float = 0.5,
    scopes: tuple[Scope, ...] = ("global", "local"),
    num_classes: int = 10,
    in_channels: int = 3,
    seed: int = 0,
    family: str = "",
    adapt_size: bool = False,
) -> CheckResult:
    """Gate, prune (each scope) and reload ``name`` at ``image_size``. Any failure ends in
    ``status`` (one line) so a sweep goes on: a model or data problem as its error, anything
    else as ``internal error: ...`` (a bug in nam-prune, reported as such). ``adapt_size``: a model
    that rejects ``image_size`` is checked at the smallest size it takes (a sweep's choice), not refused.
    Running out of memory is a reason of its own, not a bug."""
    started = time.perf_counter()
    result = CheckResult(name, image_size, family)
    shape = (in_channels, image_size, image_size)
    try:
        torch.manual_seed(seed)
        spec = ModelSpec(name, num_classes, in_channels)
        dense = build_model(spec)
        require_batchnorm(dense)
        if adapt_size and forward_error(dense, shape) is not None:
            image_size = smallest_size_above(dense, shape) or image_size
            result.image_size, shape = image_size, (in_channels, image_size, image_size)
        check_input(dense, name, shape)
        example = torch.zeros(1, *shape)
        insert_nam(dense, NAMConfig(), example)
        _randomize_scales(dense, seed)
        dense.eval()
        result.macs_before, result.params_before = count_macs_params(dense, example)
        result.kept_whole = kept_whole_counts(dense)
        inputs = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
        for scope in scopes:
            model = copy.deepcopy(dense)
            # channel by channel: the check is about the graph, and keeps the committed sweep's figures
            pruned = prune_model(model, example, PruneConfig(macs_keep=macs_keep, scope=scope, round_to=1))
            result.macs_after[scope], result.params_after[scope] = count_macs_params(model, example)
            record = ModelRecord(spec, shape, NAMConfig(), pruned.history)
            difference = _reload_difference(model, record, inputs)
            result.reload_max_abs_diff = max(result.reload_max_abs_diff, difference)
    except NamPruneError as error:
        result.status = str(error)
    except Exception as error:  # a row per model: one bug must not hide the rest of the sweep
        # torch's allocator reports running out of memory as a RuntimeError, Python as a MemoryError
        if isinstance(error, MemoryError) or "can't allocate memory" in str(error):
            result.status = f"ran out of memory checking it at {image_size} px; not supported"
        else:
            result.status = f"{INTERNAL_ERROR}: {type(error).__name__}: {first_line(error, 200)}"
    result.seconds = round(time.perf_counter() - started, 2)
    return result


WORKER_MEMORY_SHARE = 0.75
"""A sweep worker may map this share of the machine's memory: a model that needs more fails in
the worker (MemoryError, its row says so) before the kernel's OOM killer picks a process."""


def _cap_memory() -> None:
    """Cap the worker's address space (POSIX; elsewhere the worker runs uncapped)."""
    try:
        import resource

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        resource.setrlimit(resource.RLIMIT_AS, (int(total * WORKER_MEMORY_SHARE), resource.RLIM_INFINITY))
    except (ImportError, ValueError, OSError):
        pass


WORKER_SECONDS = 300
"""A swept model still unchecked after this long is stopped and gets a row saying so (the slowest
that finish take about two minutes on one core; torch-pruning's dependency groups can grow without
bound on some channel reshapes, e.g. timm's efficientvit_m0 attention)."""


class IsolatedChecks:
    """Runs :func:`check_model` in a worker process, so a model that exhausts memory, crashes the
    interpreter or runs past ``WORKER_SECONDS`` ends in its own row (the sweep goes on) instead of
    ending the sweep; each model gets a fresh worker."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> IsolatedChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def check(self, name: str, image_size: int, macs_keep: float, family: str = "") -> CheckResult:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_cap_memory
            )
        started = time.perf_counter()
        try:
            future = self._pool.submit(check_model, name, image_size, macs_keep, family=family, adapt_size=True)
            return future.result(timeout=WORKER_SECONDS)
        except concurrent.futures.TimeoutError:
            status = f"not checked in {WORKER_SECONDS} s at {image_size} px (stopped); not supported"
        except BrokenProcessPool:
            status = (f"the check's process died (out of memory at {image_size} px, or a crash); "
                      "check it alone with a smaller --image-size")
        finally:
            self._stop()
        return CheckResult(name, image_size, family, seconds=round(time.perf_counter() - started, 2), status=status)

    def _stop(self) -> None:
        """End the worker, done, running or dead: every model gets a fresh one, so memory one model leaves
        behind cannot fail the next (reused, one worker's address space filled up and every later model
        of a sweep failed to allocate). The executor cannot kill a running task before Python 3.14, so
        its process is killed directly."""
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None


def markdown_table(results: list[CheckResult]) -> str:
    """The coverage table (docs/model_sweep.md): MACs and params before -> after (global scope), status."""
    rows = ["| family | model | input px | MACs before -> after (global / local) | params before -> after (global) | status |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if r.status != "ok":
            reason = "no BatchNorm (not supported)" if "no BatchNorm2d" in r.status else r.status.replace("|", "\\|")
            rows.append(f"| {r.family} | {r.model} | {r.image_size} | - | - | {reason} |")
            continue
        macs = f"{r.macs_before / 1e6:.1f}M -> {r.macs_after['global'] / 1e6:.1f}M / {r.macs_after['local'] / 1e6:.1f}M"
        params = f"{r.params_before / 1e6:.2f}M -> {r.params_after['global'] / 1e6:.2f}M"
        kept = "; ".join(f"{kind} ×{count}" for kind, count in r.kept_whole.items())
        rows.append(f"| {r.family} | {r.model} | {r.image_size} | {macs} | {params} | ok{f' (kept whole: {kept})' if kept else ''} |")
    return "\n".join(rows) + "\n"
