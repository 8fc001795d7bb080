"""One rich console for progress bars, tables and errors, on stderr so ``--json`` stdout stays clean."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nam_prune import distributed

console = Console(stderr=True)


def progress_bar() -> Progress:
    """A transient bar: it disappears when done and leaves the one-line epoch summary behind.

    Only rank 0 draws under torchrun."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=True,
        disable=not distributed.is_main(),
    )
