"""``nam-prune``: a thin click layer over the public API. Errors print one line and exit non-zero."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from rich.logging import RichHandler
from rich.text import Text

from nam_prune.console import console
from nam_prune.errors import NamPruneError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logger = logging.getLogger("nam_prune")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


@click.group()
@click.option("--debug", is_flag=True, help="Show full tracebacks (for bug reports).")
@click.option("-v", "--verbose", is_flag=True, help="More log output.")
@click.version_option(package_name="nam-prune")
def cli(debug: bool, verbose: bool) -> None:
    """Compress convolutional networks with NAM (normalization-based attention) pruning.

    ``--debug`` is read by ``main`` from argv, since errors are handled outside click.
    """
    _setup_logging(verbose)
    from nam_prune.measure import fit_threads_to_quota

    fit_threads_to_quota()


def _global_flags(ctx: click.Context) -> list[str]:
    """The group's --debug / -v, to hand on to processes started under torchrun."""
    params = ctx.find_root().params
    return [*(["--debug"] if params.get("debug") else []), *(["-v"] if params.get("verbose") else [])]


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder instead of numbering a new one.")
@click.option("--resume", is_flag=True, help="Continue the latest interrupted run of RECIPE from its last complete epoch.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, help="Processes to start under torchrun (DDP).")
@click.pass_context
def run(ctx: click.Context, recipe: Path, overrides: tuple[str, ...], overwrite: bool, resume: bool, nproc: int) -> None:
    """Run the pipeline a RECIPE describes; OVERRIDES are section.key=value pairs."""
    from nam_prune import distributed
    from nam_prune.pipeline import run as run_pipeline
    from nam_prune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)  # validate before starting any process
    if nproc > 1 and not distributed.launched_by_torchrun():
        flags = [*(["--overwrite"] if overwrite else []), *(["--resume"] if resume else [])]
        distributed.launch(nproc, [*_global_flags(ctx), "run", str(recipe), *overrides, *flags])
        return
    run_pipeline(loaded, overwrite=overwrite, resume=resume)


def parse_data_option(text: str):
    """``report --data``: a data set name, a recipe (its ``data:`` section, or a detector's ``yolo:``) or an ultralytics data yaml."""
    import yaml

    from nam_prune.config import from_dict
    from nam_prune.data import DataConfig
    from nam_prune.recipe import load_recipe

    if not text.endswith((".yaml", ".yml")):
        return from_dict(DataConfig, {"name": text}, prefix="data.")
    path = Path(text)
    try:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        tree = None
    if isinstance(tree, dict) and "names" in tree:  # ultralytics data yaml (path, train, val, names)
        return path
    recipe = load_recipe(path)
    return recipe.sections["yolo"] if isinstance(tree, dict) and "yolo" in tree else recipe.data  # a detector's data


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", help="Score on a data set name, a recipe's data (.yaml) or an ultralytics data yaml.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object to stdout.")
@click.option("--onnx", "with_onnx", is_flag=True,
              help="Add onnxruntime CPU latency (batch 1): FP32, and INT8 where calibration data is at hand (--data or the run's recipe).")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write gamma/channel plots here.")
@click.option("--model", "model_name", help="Architecture of a plain state dict saved outside nam-prune (e.g. resnet18).")
@click.option("--image-size", type=click.IntRange(min=8), default=224, show_default=True,
              help="Input side for a model saved outside nam-prune.")
@click.option("--trust-pickle", is_flag=True, help="Read a whole pickled model (it can run code: only files you trust).")
def report(
    model: Path, data: str | None, as_json: bool, with_onnx: bool, plots: Path | None,
    model_name: str | None, image_size: int, trust_pickle: bool,
) -> None:
    """Params, MACs and the per-layer table of a saved MODEL; its score with --data.

    MODEL is a nam-prune checkpoint, or a state dict / pickled model saved elsewhere (see --model, --trust-pickle).
    """
    from nam_prune.report import inspect_checkpoint, layer_table, summary_table

    # with --json, stdout carries only the JSON object: ultralytics (imported here) logs to stdout
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = inspect_checkpoint(
            model, parse_data_option(data) if data else None, with_onnx=with_onnx, plots=plots,
            model_name=model_name, image_size=image_size, trust_pickle=trust_pickle,
        )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    stages = {"this model": summary}
    for path in summary.get("plots", []):
        console.print(f"wrote {path}", soft_wrap=True)
    recorded = {k: v for k, v in summary.get("recorded", {}).items() if isinstance(v, dict) and "params" in v}
    if recorded:
        stages = {**recorded, "this model": summary}
    columns = tuple(tuple(column) for column in summary["columns"])
    console.print(summary_table(stages, title=f"{model}", columns=columns))
    console.print(layer_table(summary["layers"], only_changed=False))


DEFAULT_MACS_KEEP = "0.7,0.5,0.3"


def _compare_budgets(macs_keep: str | None, budgets: str | None) -> list[float]:
    """``--macs-keep`` (shares kept, as ``prune.macs_keep`` in ``run``), or the deprecated ``--budgets``
    (shares removed) converted to it with a one-line warning; both together are refused."""
    if macs_keep is not None and budgets is not None:
        raise click.UsageError("--budgets is the old form of --macs-keep (shares removed, not kept): give only --macs-keep")
    try:
        values = [float(v) for v in (budgets if budgets is not None else macs_keep or DEFAULT_MACS_KEEP).split(",")]
    except ValueError:  # float()'s message only repeats the text
        raise click.BadParameter(f"{'--budgets' if budgets is not None else '--macs-keep'} takes numbers, comma-separated") from None
    if budgets is None:
        return values
    if any(not 0 < v < 1 for v in values):
        raise click.BadParameter("--budgets are shares of the MACs to remove, each strictly between 0 and 1")
    keeps = [round(1 - v, 10) for v in values]
    _print_line("warning:", f"--budgets (shares of the MACs removed) is deprecated: use --macs-keep {','.join(f'{k:g}' for k in keeps)}")
    return keeps


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option(
    "--criteria", default="nam,bn_slimming,l1,random", show_default=True,
    help="Comma-separated, of nam, nam_reference, bn_slimming, bn_slimming_polarized, group_sl (torch-pruning's "
    "group sparse learning, then group L2 norm), l1, taylor (first-order Taylor on the task loss's gradients), "
    "random, dense (unpruned). group_sl and taylor: classifiers only.",
)
@click.option(
    "--macs-keep", "macs_keep",
    help=f"Shares of the dense MACs to keep, comma-separated, as prune.macs_keep in run.  [default: {DEFAULT_MACS_KEEP}]",
)
@click.option("--budgets", help="Deprecated: shares of the MACs to remove; use --macs-keep (1 - each).")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Default: runs/compare-<name>")
def compare(
    recipe: Path, overrides: tuple[str, ...], criteria: str, macs_keep: str | None, budgets: str | None, seeds: str,
    output: Path | None,
) -> None:
    """Compare ranking criteria at matched MAC budgets on a RECIPE (resumes an interrupted comparison)."""
    from nam_prune.compare import compare as run_compare
    from nam_prune.compare import print_summary
    from nam_prune.plots import plot_accuracy_vs_macs
    from nam_prune.recipe import load_recipe

    keeps = _compare_budgets(macs_keep, budgets)
    loaded = load_recipe(recipe, overrides)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:  # int()'s message only repeats the text
        raise click.BadParameter("--seeds takes integers, comma-separated") from None
    folder = output or Path("runs") / f"compare-{loaded.name}"
    state = run_compare(loaded, criteria.split(","), keeps, seed_list, folder)
    print_summary(state)
    plot_accuracy_vs_macs(state["summary"], folder / "accuracy_vs_macs.png", state["score_key"])
    console.print(f"wrote {folder / 'compare.json'} and {folder / 'accuracy_vs_macs.png'}", soft_wrap=True)


def _refuse_options_of_the_other_format(fmt: str) -> None:
    """An option the chosen format ignores would silently change nothing: say so instead."""
    context = click.get_current_context()
    other, options = {
        "onnx": ("torchscript", ("whole_batch",)), "torchscript": ("onnx", ("opset", "dynamic_batch", "int8", "calibration")),
    }[fmt]
    given = [name for name in options if context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        flags = " and ".join("--" + name.replace("_", "-") for name in given)
        verb, them = ("is", "it") if len(given) == 1 else ("are", "them")
        default = ", the default" if context.get_parameter_source("fmt") is ParameterSource.DEFAULT else ""
        raise NamPruneError(
            f"{flags} {verb} for --format {other} and this export is {fmt}{default}: drop {them} or add --format {other}"
        )


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--opset", type=click.IntRange(min=9), default=17, show_default=True, help="ONNX only.")
@click.option("--dynamic-batch", is_flag=True, help="Let the batch dimension vary (ONNX only).")
@click.option(
    "--whole-batch", is_flag=True,
    help="TorchScript only: run large batches whole, not in slices "
    "(faster where the allocator keeps freed memory: jemalloc, tcmalloc, tuned glibc).",
)
@click.option(
    "--int8", is_flag=True,
    help="ONNX only: also write the onnxruntime static INT8 form beside it (NAME.int8.onnx; QDQ, per-channel weights), "
    "calibrated on training images, and print both files' test score.",
)
@click.option("--calibration", help="With --int8: calibrate and score on this data set name or recipe .yaml, not the recipe MODEL stores.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: MODEL with .onnx / .torchscript")
def export(
    model: Path, fmt: str, opset: int, dynamic_batch: bool, whole_batch: bool, int8: bool, calibration: str | None,
    output: Path | None,
) -> None:
    """Export a saved MODEL to ONNX (checked, onnxruntime vs torch) or frozen TorchScript (for plain
    PyTorch deployment); outputs must match eager torch within 1e-4. With --int8 also an INT8 ONNX file."""
    from nam_prune.artifact import load_with_metadata, record_of
    from nam_prune.export import export_onnx, export_torchscript
    from nam_prune.tasks import task_class

    _refuse_options_of_the_other_format(fmt)
    if calibration is not None and not int8:
        raise click.UsageError("--calibration names the data --int8 calibrates on: add --int8 or drop it")
    target = output or model.with_suffix(f".{fmt}")
    if target.resolve() == model.resolve():
        raise NamPruneError(f"the export would overwrite {model}, the checkpoint it reads; name another file with -o")
    module, payload = load_with_metadata(model)
    record = record_of(payload)
    task = task_class(record.spec.name)
    if fmt == "torchscript":
        result = export_torchscript(module, record.example_input(), target, task.deploy_mode, batch_chunks=not whole_batch)
        console.print(f"wrote {result.path} (frozen TorchScript, max |eager - TorchScript| = {result.max_abs_diff:.1e})", soft_wrap=True)
        return
    if not int8:
        result = export_onnx(module, record.example_input(), target, opset, dynamic_batch, task.deploy_mode)
        console.print(
            f"wrote {result.path} (opset {result.opset}, max |torch - onnxruntime| = {result.max_abs_diff:.1e})",
            soft_wrap=True,
        )
        return
    from nam_prune.int8 import export_int8, quantization_tools
    from nam_prune.tasks import int8_data_for

    quantization_tools()  # its install hint before any data loads
    data = int8_data_for(task, payload, str(model), parse_data_option(calibration) if calibration else None)
    done = export_int8(module, record.example_input(), target, data, opset, dynamic_batch, task.deploy_mode)
    console.print(f"wrote {target} (opset {opset}, max |torch - onnxruntime| = {done.fp32.max_abs_diff:.1e})", soft_wrap=True)
    console.print(f"wrote {done.path} (onnxruntime static INT8: QDQ, uint8 activations, per-channel int8 weights; "
                  f"calibrated on {data.calibration_images} training images)", soft_wrap=True)
    console.print(done.scores_line(task.score_label()), soft_wrap=True)


@cli.command()
@click.argument("names", nargs=-1)
@click.option(
    "--sweep", type=click.Choice(["all", "torchvision", "timm"]), is_flag=False, flag_value="all", default=None,
    help="Every torchvision model and one model per timm BN family (docs/model_sweep.md); or only one of the two.",
)
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--macs-keep", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here.")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as Markdown here.")
def check(names: tuple[str, ...], sweep: str | None, image_size: int, macs_keep: float, json_path: Path | None,
          markdown: Path | None) -> None:
    """Can nam-prune compress these architectures (model names as in a recipe)? Gates, a cut to
    --macs-keep of the MACs in global and local scope, and a weights-only reload, on random weights."""
    from dataclasses import asdict

    from rich.table import Table

    from nam_prune.check import LEAST_MACS_KEEP, SMALLEST_SIZE, IsolatedChecks, check_model, markdown_table, sweep_names
    from nam_prune.checkpoint import atomic_write, check_writable
    from nam_prune.models import family_for

    if not names and not sweep:
        raise click.UsageError("name at least one model, or pass --sweep")
    for name in names:  # a misspelt name is a one-line error before any model is built, not a table row
        family_for(name)
    for output in (json_path, markdown):
        if output:
            check_writable(output)
    table = Table(title=f"nam-prune check: {macs_keep:.0%} of the MACs kept (share kept per scope)")
    for column in ("family", "model", "input", "MACs before", "global", "local", "params after (global)", "status"):
        table.add_column(column, justify="left" if column in ("family", "model", "status") else "right")
    results = []
    with console.status("checking") as status, IsolatedChecks() as isolated:
        if sweep:
            status.update("listing the models to sweep (timm's registry is read on the meta device)")
        chosen = [("", name) for name in names] + (sweep_names(sweep) if sweep else [])
        for family, name in chosen:
            status.update(f"checking {name}")
            size, keep = max(image_size, SMALLEST_SIZE.get(name, 0)), max(macs_keep, LEAST_MACS_KEEP.get(name, 0))
            # a sweep checks each model in a worker process: one that runs out of memory is a row, not the end
            result = isolated.check(name, size, keep, family) if sweep else check_model(name, size, keep, family=family)
            results.append(result)
            ok = result.status == "ok"
            table.add_row(
                family, name, str(result.image_size), f"{result.macs_before / 1e6:.1f}M" if ok else "-",
                *(f"{result.macs_after[s] / result.macs_before:.3f}" if ok else "-" for s in ("global", "local")),
                f"{result.params_after['global'] / 1e6:.2f}M" if ok else "-", "ok" if ok else "stopped",
            )
    console.print(table)
    for result in results:
        if result.status != "ok":
            console.print(f"{result.model}: {result.status}", soft_wrap=True)
        elif result.kept_whole:
            kept = ", ".join(f"{kind} ({count} blocks)" for kind, count in result.kept_whole.items())
            console.print(f"{result.model}: kept whole: {kept}", soft_wrap=True)
    command = "nam-prune check " + " ".join([*names, *([f"--sweep {sweep}"] if sweep else [])])
    if json_path:
        text = json.dumps({"command": command, "results": [asdict(r) for r in results]}, indent=1)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    if markdown:
        atomic_write(markdown, lambda tmp: Path(tmp).write_text(markdown_table(results)))
    if any(r.status != "ok" and "no BatchNorm2d" not in r.status for r in results):
        raise SystemExit(1)


@cli.group()
def data() -> None:
    """Build data sets offline."""


@data.command("fashion-detect")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder to write.")
@click.option("--images", type=click.IntRange(min=10), default=2000, show_default=True, help="Canvases (a fifth for val).")
@click.option("--imgsz", type=click.IntRange(min=64), default=160, show_default=True, help="Canvas side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
def fashion_detect(out: Path, images: int, imgsz: int, seed: int) -> None:
    """A detection set in ultralytics' layout from Fashion-MNIST items on larger canvases (offline)."""
    from nam_prune.fashion_detect import FashionDetectConfig, make_fashion_detect

    data_yaml = make_fashion_detect(out, FashionDetectConfig(images=images, imgsz=imgsz, seed=seed))
    console.print(f"wrote {data_yaml} ({images} images of {imgsz} px); train a YOLO recipe with yolo.data={data_yaml}")


def _add_family_commands() -> None:
    """Commands installed model families bring (YOLO's ``train-detector``)."""
    from nam_prune.models import plugin_families

    for family in plugin_families():
        for command in family.commands() if family.commands else ():
            cli.add_command(command)


_add_family_commands()


def _print_line(label: str, message: str) -> None:
    """One line on stderr, ``error:`` or ``warning:`` first (and the rank under torchrun)."""
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if rank != "0" else ""
    style = "bold red" if label == "error:" else "bold yellow"
    console.print(Text.assemble(prefix, (label, style), f" {message}"), soft_wrap=True)


def _print_error(message: str) -> None:
    _print_line("error:", message)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run click on ``argv`` (default: the command line), turning every known failure
    into one line and an exit code. Tests call it in-process with their own ``argv``."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="nam-prune", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Abort:
        console.print("interrupted", style="yellow")
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as error:  # click's own form is four lines (usage, hint, blank, error)
        command = error.ctx.command_path if error.ctx else "nam-prune"
        _print_error(f"{error.format_message()} (see '{command} --help')")
        sys.exit(error.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted", style="yellow")
        sys.exit(EXIT_INTERRUPTED)
    except NamPruneError as error:
        if debug:
            raise
        _print_error(str(error))
        sys.exit(EXIT_USER_ERROR)
    except Exception as error:  # a bug: still one line unless --debug
        if debug:
            raise
        if isinstance(error, OSError) and error.filename is not None:
            # not a bug: a path the user named that the OS refuses (a file where a folder goes, no permission)
            _print_error(f"cannot use {error.filename}: {error.strerror}; choose another path")
            sys.exit(EXIT_USER_ERROR)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        console.print(
            Text.assemble(
                ("internal error:", "bold red"),
                f" {type(error).__name__}: {message} (rerun with --debug for the traceback)",
            ),
            soft_wrap=True,
        )
        sys.exit(1)
