"""``python -m benchmarks NAME [options]``: run one benchmark; ``python -m benchmarks --help`` lists them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from benchmarks import names, summary

USAGE = "usage: python -m benchmarks NAME [options]   (python -m benchmarks NAME --help: that benchmark's options)"


def listing() -> str:
    width = max(len(name) for name in names())
    return "\n".join([USAGE, "", "benchmarks:", *(f"  {name:<{width}}  {summary(name)}" for name in names())])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv[0]``'s ``main`` with the rest of ``argv``: 0 when it returns; with no name or
    ``--help``, the list of benchmarks (exit 2 and 0); an unknown name is a one-line error, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names():
        print(f"python -m benchmarks: unknown benchmark {name!r}; choose from {', '.join(names())}", file=sys.stderr)
        return 2
    importlib.import_module(f"benchmarks.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
