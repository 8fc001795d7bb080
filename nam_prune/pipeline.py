"""The whole run a recipe describes, once for every model family:

build (+ NAM gates) -> sparsity training -> measure -> prune (in steps) -> fine-tune ->
save and report, into a run folder as ``dense.pt``, ``model.pt`` and ``results.json``.
The family's :class:`~nam_prune.tasks.Task` supplies what differs (data, training loop,
score, protected parts, extra outputs).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from nam_prune import distributed, gate_kernel
from nam_prune.artifact import ModelRecord, load_state, rebuild, record_of, save
from nam_prune.checkpoint import atomic_write, library_versions, read_checkpoint
from nam_prune.console import console
from nam_prune.errors import NamPruneError
from nam_prune.int8 import Int8Data, export_int8, int8_results, int8_summary, quantization_tools
from nam_prune.prune import PruneResult, channel_counts, check_prunable, kept_whole_counts
from nam_prune.recipe import Recipe, changed_keys
from nam_prune.report import layer_changes, layer_table, summary_table
from nam_prune.stages import PruneAndFinetune, train_stage
from nam_prune.tasks import Task, task_class
from nam_prune.train import TrainState, enable_compile

log = logging.getLogger("nam_prune")

LAST = "last.pt"
STAGE_LABELS = {
    "before": "dense (sparsity-trained)",
    "pruned": "pruned",
    "recalibrated": "pruned + BN recalibrated",
    "after": "fine-tuned",
    "baseline": "dense, trained as long",
}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows: noise next to this one
        raise NamPruneError(f"device = {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NamPruneError(f"device = {name!r} but CUDA is not available here; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _base_folder(recipe: Recipe) -> Path:
    return Path(recipe.output or Path("runs") / recipe.name)


def run_folder(recipe: Recipe, overwrite: bool) -> Path:
    """``runs/<name>`` (or ``output:``); an existing non-empty folder gets a numbered sibling
    (``<name>-2``, like ultralytics) unless ``overwrite`` is set."""
    base = _base_folder(recipe)
    folder, number = base, 1
    while not overwrite and folder.is_dir() and any(folder.iterdir()):
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NamPruneError(f"cannot create run folder {folder}: {error.strerror}; set output: to a writable path") from error
    if folder != base:
        log.info("%s already holds a run: writing to %s (use --overwrite to replace it)", base, folder)
    return folder


def _numbered_runs(base: Path) -> list[Path]:
    """``base`` and its numbered siblings (``base-2``, ``base-3`` ...), oldest first."""
    pattern = re.compile(rf"{re.escape(base.name)}-(\d+)")
    numbered = [
        (int(match.group(1)), path)
        for path in (base.parent.iterdir() if base.parent.is_dir() else [])
        if (match := pattern.fullmatch(path.name))
    ]
    return [base, *(path for _, path in sorted(numbered))]


def _resume_point(recipe: Recipe, recipe_dict: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The latest interrupted run of this recipe and output: its folder and its ``last.pt`` payload."""
    base = _base_folder(recipe)
    interrupted = [folder for folder in _numbered_runs(base) if (folder / LAST).is_file()]
    if not interrupted:
        raise NamPruneError(
            f"nothing to resume: no {LAST} in {base} or its numbered siblings; run without --resume to start"
        )
    path = interrupted[-1] / LAST
    payload = read_checkpoint(path)
    if not payload.get("recipe"):
        raise NamPruneError(f"{path} records no recipe, so it cannot be resumed: run without --resume to start over")
    changed = changed_keys(payload["recipe"], recipe_dict)
    if changed:
        raise NamPruneError(
            f"{path} was written by a different recipe ({changed}); "
            "resume with the same recipe file and overrides"
        )
    return interrupted[-1], payload


@dataclass
class RunResult:
    folder: Path
    results: dict[str, Any]
    model: nn.Module


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run the pipeline end to end and return the run folder, results and pruned model.

    After every complete training epoch the run is checkpointed to ``<folder>/last.pt``
    (atomically); ``resume=True`` continues the latest interrupted run of this recipe and
    ends where an uninterrupted run with the same seed would. Under torchrun every rank
    runs this; only rank 0 writes.
    """
    device = resolve_device(recipe.device)
    cls = task_class(recipe.model.name)
    if resume and not cls.resumable:
        raise NamPruneError(f"--resume is not available for {recipe.model.name}: start the run again")
    distributed.init_from_env(device)
    try:
        if distributed.world_size() > 1 and not cls.multi_process:
            raise NamPruneError(f"{recipe.model.name} runs in one process (--nproc 1); device: picks the GPU")
        int8 = _int8_data(recipe, cls)
        seed_everything(recipe.seed)
        return _run(recipe, cls(recipe, distributed.local_device(device)), overwrite, resume, int8)
    finally:
        distributed.shutdown()


def _int8_data(recipe: Recipe, cls: type[Task]) -> Int8Data | None:
    """``export.int8``'s calibration and test data, loaded (or refused) before anything trains."""
    if not recipe.export.int8:
        return None
    if distributed.world_size() > 1:
        raise NamPruneError("export.int8 runs in one process (--nproc 1); or quantize the run's model.pt "
                            "afterwards with nam-prune export MODEL --int8")
    quantization_tools()
    return cls.int8_data(cls.stored_data(recipe.to_dict()), recipe.seed)


class _Run(PruneAndFinetune):
    """One run between its stages: the model, its record, the results so far and the folder.

    The shared stage sequence (``stages.PruneAndFinetune``) does the pruning and fine-tuning;
    this adds sparsity training before it, the dense baseline and the outputs after it, and
    through its hooks ``dense.pt`` and a ``last.pt`` checkpoint after every epoch; with ``int8`` data
    (``export.int8``) also the ONNX files.
    """

    def __init__(
        self, recipe: Recipe, task: Task, folder: Path, model: nn.Module, record: ModelRecord, progress: dict[str, Any],
        int8: Int8Data | None = None,
    ) -> None:
        example = record.example_input(task.device)
        super().__init__(task, model, record, example, lambda trained, label: task.measure(trained, example, label))
        self.recipe, self.folder, self.progress = recipe, folder, progress
        self.recipe_dict = recipe.to_dict()
        self.results, self.timings = progress["results"], progress["timings"]
        self.main = distributed.is_main()
        self.dense_state: dict[str, torch.Tensor] = {}
        self.int8 = int8

    def checkpoint(self, stage: str, state: TrainState | None) -> None:
        if not self.task.resumable:
            return
        self.progress.update(
            stage=stage,
            epoch=state.epoch if state else 0,
            train_state=state.to_dict() if state else None,
            rng=self.task.rng_state(),
        )
        if self.main:
            save(self.folder / LAST, self.model, self.record, recipe=self.recipe_dict, progress=self.progress)

    def resumed(self, stage: str) -> TrainState | None:
        state = self.progress["train_state"] if self.progress["stage"] == stage else None
        return TrainState.from_dict(state) if state else None

    def sparsity(self) -> None:
        """Sparsity training, then the dense model's metrics and a snapshot of its weights (``dense.pt``)."""
        tick = time.perf_counter()
        self.results["sparsity_log"] = train_stage(
            self.task, self.model, self.recipe.sparsity, "sparsity",
            on_epoch_end=lambda state: self.checkpoint("sparsity", state), resume=self.resumed("sparsity"), warm_up=True,
        )
        self.timings["sparsity_s"] = time.perf_counter() - tick
        distributed.check_replicas_identical(self.model, "sparsity training")
        self.results["before"] = self.task.measure(self.model, self.example, "dense")
        self.results["dense_channels"] = channel_counts(self.model)
        self.results["kept_whole"] = kept_whole_counts(self.model)  # blocks whose split or shared channels stay
        self.dense_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def after_prune(self, pruning: PruneResult) -> None:
        self.results["prune_threshold"] = pruning.threshold
        if pruning.latency is not None:
            self.results["latency_target"] = pruning.latency.to_dict()
        if self.main:  # written now, with the threshold, so `report dense.pt --plots` marks where the cut fell
            metrics = {"before": self.results["before"], "prune_threshold": pruning.threshold}
            save(
                self.folder / "dense.pt", self.model, self.record,
                state_dict=self.dense_state, recipe=self.recipe_dict, metrics=metrics,
            )
        distributed.check_replicas_identical(self.model, "pruning")  # every rank pruned the same channels

    def before_finetune(self) -> None:
        self.timings["prune_s"] = self.seconds["prune"]
        self.results.update(self.metrics)  # pruned (and recalibrated): kept in last.pt for a resumed run
        self.checkpoint("finetune", None)

    def on_epoch_end(self, state: TrainState) -> None:
        self.checkpoint("finetune", state)

    def stages(self) -> dict[str, dict[str, Any]]:
        """The metrics of every stage the run measured, in order."""
        measured = {**self.results, "after": self.metrics["after"]}
        return {stage: measured[stage] for stage in ("before", "pruned", "recalibrated", "after") if stage in measured}

    def int8_outputs(self, data: Int8Data) -> dict[str, Any]:
        """``model.onnx`` and its INT8 form ``model.int8.onnx`` from a CPU copy of the final model (the run
        hands back the model on its device); their scores and latencies for results.json."""
        example, report = self.record.example_input(), self.recipe.report
        done = export_int8(copy.deepcopy(self.model).cpu(), example, self.folder / "model.onnx", data,
                           deploy_mode=self.task.deploy_mode)
        return int8_results(done, example, report.latency_runs, report.warmup, self.task.score_key)

    def baseline(self) -> dict[str, Any]:
        """The dense sparsity-trained model (``dense.pt``) fine-tuned as long as the pruned one, measured."""
        tick = time.perf_counter()
        distributed.barrier()  # rank 0 wrote dense.pt
        dense_payload = read_checkpoint(self.folder / "dense.pt")
        baseline = rebuild(record_of(dense_payload))
        load_state(baseline, dense_payload["state_dict"], str(self.folder / "dense.pt"))
        baseline.to(self.task.device)
        train_stage(self.task, baseline, self.recipe.finetune, "baseline (dense, trained as long)")
        metrics = self.task.measure(baseline, self.example, "baseline")
        self.timings["baseline_s"] = time.perf_counter() - tick
        return metrics

    def save_outputs(self, final: dict[str, Any], stages: dict[str, dict[str, Any]], started: float) -> None:
        """``model.pt``, ``results.json``, the task's files and the ONNX files of ``export.int8`` (rank 0);
        the summary tables."""
        task, folder = self.task, self.folder
        final.update(task.outputs(folder, self.model, self.record, stages))
        if self.int8 is not None:
            final["int8"] = self.int8_outputs(self.int8)
        metrics = {**stages, "prune_threshold": self.results["prune_threshold"]}
        save(
            folder / "model.pt", self.model, self.record,
            recipe=self.recipe_dict, metrics=metrics, layers=final["layers"], **task.checkpoint_fields(),
        )
        self.timings["total_s"] = self.timings.get("total_s", 0.0) + time.perf_counter() - started
        atomic_write(folder / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
        (folder / LAST).unlink(missing_ok=True)  # the run is complete: model.pt supersedes it
        console.print(summary_table({STAGE_LABELS[k]: v for k, v in stages.items()}, columns=task.columns))
        if "baseline" in stages:
            drop = 100 * (stages["after"][task.score_key] - stages["baseline"][task.score_key])
            console.print(f"fine-tuned vs dense trained as long: {drop:+.2f} pt {task.score_key}")
        if "latency_target" in final:
            search = final["latency_target"]
            console.print(
                f"latency on {search['runtime']} at batch {search['batch']}: {search['ratio']:.3f} of the dense model's "
                f"({search['ms']:.2f} vs {search['dense_ms']:.2f} ms; target {search['target']:.3f}, "
                f"{len(search['trials'])} candidate cuts timed)"
            )
        if "int8" in final:
            console.print(int8_summary(final["int8"], task.score_key, task.score_label()), soft_wrap=True)
        console.print(layer_table(final["layers"], only_changed=True))
        console.print(f"saved [bold]{folder / 'model.pt'}[/] and [bold]{folder / 'results.json'}[/]", soft_wrap=True)


def _start(recipe: Recipe, task: Task, overwrite: bool, resume: bool, int8: Int8Data | None) -> _Run:
    """A new run (its prune settings checked on an untrained copy, then its folder made) or the
    latest interrupted one of this recipe, from its ``last.pt``."""
    if resume:
        folder, payload = _resume_point(recipe, recipe.to_dict())
        record = record_of(payload)
        model = rebuild(record)
        load_state(model, payload["state_dict"], str(folder / LAST))
        progress = payload["progress"]
        task.restore_rng(progress["rng"])
        log.info("resuming %s at %s epoch %d", folder, progress["stage"], progress["epoch"])
    else:
        model, record = task.prepare()
        trial = copy.deepcopy(model).eval()  # a prune setting that cannot work fails now, not after training
        check_prunable(trial, record.example_input(), recipe.prune, task.protected(trial), task.deploy_mode)
        # only once the inputs are known to be good; rank 0 picks it for everyone
        folder = distributed.broadcast_object(run_folder(recipe, overwrite) if distributed.is_main() else None)
        progress = {"stage": "sparsity", "epoch": 0, "train_state": None, "results": {}, "timings": {}}
    task.open(folder)
    log.info("run folder %s, device %s, %d process(es)", folder, task.device, distributed.world_size())
    if task.device.type == "cpu" and not recipe.nam.compile:
        log.info("NAM gates train on %s", gate_kernel.status())
    model.to(task.device)
    return _Run(recipe, task, folder, model, record, progress, int8)


def _run(recipe: Recipe, task: Task, overwrite: bool, resume: bool, int8: Int8Data | None) -> RunResult:
    started = time.perf_counter()
    if not distributed.is_main():
        log.setLevel(logging.WARNING)
    enable_compile(recipe.nam.compile, task.device)
    job = _start(recipe, task, overwrite, resume, int8)
    fresh = job.progress["stage"] == "sparsity"  # else resumed after the cut, during fine-tuning
    try:
        if fresh:
            job.sparsity()
        job.run(recipe.prune, recipe.finetune, cut=fresh, resume=job.resumed("finetune"))
    except KeyboardInterrupt:
        if job.main and (job.folder / LAST).is_file():
            log.warning("interrupted: the last complete epoch is in %s; rerun the same command with --resume", job.folder / LAST)
        raise
    job.timings["finetune_s"] = job.timings.get("finetune_s", 0.0) + job.seconds["finetune"]
    layers = layer_changes(job.results["dense_channels"], channel_counts(job.model))
    distributed.check_replicas_identical(job.model, "fine-tuning")
    stages = job.stages()
    if recipe.report.baseline and recipe.finetune.epochs:
        stages["baseline"] = job.baseline()
    final = {
        **stages,
        "macs_kept": stages["after"]["macs"] / stages["before"]["macs"],
        "prune_threshold": job.results["prune_threshold"],
        **{key: job.results[key] for key in ("kept_whole", "latency_target") if key in job.results},
        "layers": layers,
        "training": {"sparsity": job.results["sparsity_log"], "finetune": job.finetune_log},
        "timings": job.timings,
        "device": str(task.device),
        "processes": distributed.world_size(),
        "recipe": job.recipe_dict,
        "versions": library_versions(),
    }
    if job.main:
        job.save_outputs(final, stages, started)
    distributed.barrier()
    return RunResult(job.folder, final, job.model)


__all__ = ["RunResult", "run", "resolve_device", "seed_everything"]
