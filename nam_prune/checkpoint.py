"""Checkpoint files: weights-only reads, atomic writes and the format version (a leaf module).

Nothing here knows about models: ``nam_prune.artifact`` turns a model into the plain
values written here and back. Reads use ``weights_only=True``, so a file never runs code
unless the user vouches for it; writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import pickle
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torchvision

from nam_prune.errors import NamPruneError, first_line
from nam_prune.version import __version__

T = TypeVar("T")

FORMAT = "nam-prune"
FORMAT_VERSION = 3  # 2: nam.gate recorded (format 1 files hold reference gates); 3: pruning history per layer


def library_versions() -> dict[str, str]:
    return {
        "nam_prune": __version__,
        "torch": str(torch.__version__),  # TorchVersion is a str subclass that weights-only loading refuses
        "torchvision": str(torchvision.__version__),
        # the installed metadata: the 1.6.0 wheel has no ``torch_pruning.__version__`` and 1.6.1 says "1.6.0" there
        "torch_pruning": importlib.metadata.version("torch-pruning"),
        "python": platform.python_version(),
    }


def atomic_write(path: Path, write: Callable[[str], T]) -> T:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see half a file, and a
    ``write`` that raises (a failed check of the written file, say) leaves none. Returns what ``write`` does."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        result = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return result


def _temp_beside(path: Path) -> str:
    """An empty temporary file in ``path``'s folder (made if missing), or a one-line error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        raise _cannot_write(path.parent, error) from error
    os.close(handle)
    return tmp


def _cannot_write(folder: Path, error: Exception, where: str = "") -> NamPruneError:
    """The one-line error for an output folder: the system's reason (``strerror``) where it gave one."""
    reason = getattr(error, "strerror", None) or error
    return NamPruneError(f"cannot write to {folder}: {reason}{where}; choose another output folder")


def check_writable(path: Path) -> None:
    """Fail now, not after minutes of work, if ``atomic_write(path, ...)`` could not write there.
    Leaves nothing behind: a missing folder is not made yet (a failure later would leave it
    empty); its nearest existing parent is probed instead, with a folder made and removed there."""
    folder = existing = Path(path).parent
    if "\0" in str(path):  # exists() calls such a path missing, and the probe would pass
        raise NamPruneError(f"cannot write to {str(path)!r}: the path holds a NUL character; choose another output path")
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink() or p == p.parent)
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if existing == folder:
            os.unlink(_temp_beside(Path(path)))
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".nam-prune-probe.", dir=existing))
    except OSError as error:
        raise _cannot_write(folder, error, "" if existing == folder else f" ({existing})") from error


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain values) with the format header and library versions."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": library_versions()}
    atomic_write(path, lambda tmp: torch.save({**header, **payload}, tmp))


TRUST_IN_RECIPE = "set model.trust_pickle: true"


def read_checkpoint(path: str | Path, trust_pickle: bool = False, how_to_trust: str = TRUST_IN_RECIPE) -> Any:
    """Read a file with ``weights_only=True``; pickled objects are refused.

    ``trust_pickle=True`` (the recipe's ``model.trust_pickle``, ``report --trust-pickle``)
    allows full unpickling for a file the user vouches for, such as a whole saved
    ``nn.Module``: it can run code. ``how_to_trust`` is what the refusal tells the user to do.
    """
    path = Path(path)
    if not path.is_file():
        raise NamPruneError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise NamPruneError(f"checkpoint {path} is empty (an interrupted copy?); use the original file")
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before it fails on it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported global" in line]
        if not lines:  # an invalid opcode or a broken stream, not a class reference: damaged bytes
            raise NamPruneError(f"cannot read checkpoint {path}: it is corrupt or not a torch.save file; use the original file") from error
        detail = f" ({lines[0][:160]})"
        raise NamPruneError(
            f"refused to load {path}: it holds pickled objects that weights-only loading does not allow"
            f"{detail}; re-save it as a plain state dict, or {how_to_trust} only if you trust its source"
        ) from error
    except Exception as error:  # truncated zips, random bytes: torch raises many types for these
        raise NamPruneError(
            f"cannot read checkpoint {path}: it is corrupt or truncated ({first_line(error, 80)}); use the original file"
        ) from error
    if is_nam_checkpoint(payload) and payload.get("format_version", 1) > FORMAT_VERSION:
        raise NamPruneError(
            f"{path} was written by a newer nam-prune (checkpoint format {payload['format_version']}, this version "
            f"reads up to {FORMAT_VERSION}); upgrade: pip install -U nam-prune"
        )
    return payload


def is_nam_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT
