"""nam-prune's benchmarks, one tool: ``python -m benchmarks NAME [options]`` (``--help`` lists them).

Each benchmark is a module here with a docstring (its first line is its one-line summary) and
``main(argv)``; ``timing`` is the helper they share. They run from a checkout of the repository
(this package is not installed with nam-prune) and write their JSON through ``timing.write_result``.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

HELPERS = frozenset({"timing"})  # modules here that are not benchmarks


def names() -> list[str]:
    """The benchmarks, sorted: every module in this package but the helpers."""
    return sorted(module.name for module in pkgutil.iter_modules(__path__)
                  if module.name not in HELPERS and not module.name.startswith("_"))


def summary(name: str) -> str:
    """A benchmark's one-line summary, the first line of its docstring, read without importing it
    (importing one loads torch or ultralytics)."""
    doc = ast.get_docstring(ast.parse((Path(__file__).parent / f"{name}.py").read_text())) or ""
    return doc.splitlines()[0] if doc else ""
