"""Stage 6a: save and load models as weights-only files that never run code when read.

A checkpoint holds only tensors and plain values: the model spec, the NAM config, the
input shape, torch-pruning's pruning history and the state dict (plus recipe, metrics
and versions). Loading rebuilds the dense model, re-inserts the gates, replays the
pruning through the dependency graph and loads the weights, so the result is the exact
saved module. Files are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import os
import pickle
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, build_model
from nam_prune.prune import PruningHistory, replay
from nam_prune.surgery import NAMConfig, insert_nam, strip_gates

FORMAT = "nam-prune"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    import torch_pruning
    import torchvision

    from nam_prune import __version__

    return {
        "nam_prune": __version__,
        "torch": str(torch.__version__),  # TorchVersion is a str subclass that weights-only loading refuses
        "torchvision": str(torchvision.__version__),
        "torch_pruning": str(torch_pruning.__version__),
        "python": platform.python_version(),
    }


@dataclass
class ModelRecord:
    """Everything needed to rebuild a saved model, in plain values."""

    spec: ModelSpec
    input_shape: tuple[int, ...]
    nam: NAMConfig | None = None
    history: PruningHistory = field(default_factory=list)
    stripped: bool = False

    def example_input(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(1, *self.input_shape, device=device)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise NamPruneError(f"cannot write to {path.parent}: {error.strerror}; choose another output folder") from None
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, model: nn.Module, record: ModelRecord, **extra: Any) -> None:
    """Write a weights-only checkpoint; ``extra`` (recipe, metrics, layers) must be plain values."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": asdict(record.spec),
        "input_shape": list(record.input_shape),
        "nam": asdict(record.nam) if record.nam else None,
        "pruning_history": [[name, out, list(idxs)] for name, out, idxs in record.history],
        "gates_stripped": record.stripped,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "versions": library_versions(),
        **extra,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> Any:
    """Read a file with ``weights_only=True``; pickled objects are refused.

    ``trust_pickle=True`` (the recipe's ``model.trust_pickle``) allows full unpickling for
    a file the user vouches for, such as a whole saved ``nn.Module``: it can run code.
    """
    path = Path(path)
    if not path.is_file():
        raise NamPruneError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise NamPruneError(f"checkpoint {path} is empty (an interrupted copy?); use the original file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported global" in line]
        if not lines:  # an invalid opcode or a broken stream, not a class reference: damaged bytes
            raise NamPruneError(f"cannot read checkpoint {path}: it is corrupt or not a torch file") from None
        detail = f" ({lines[0][:160]})"
        raise NamPruneError(
            f"refused to load {path}: it holds pickled objects that weights-only loading does not allow"
            f"{detail}; re-save it as a plain state dict, or set model.trust_pickle: true only if you trust its source"
        ) from None
    except Exception as error:  # truncated zips, random bytes: torch raises many types for these
        raise NamPruneError(f"cannot read checkpoint {path}: it is corrupt or truncated ({_first_line(error)})") from None
    return payload


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def is_nam_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def record_of(payload: dict[str, Any]) -> ModelRecord:
    try:
        return ModelRecord(
            spec=ModelSpec(**payload["model"]),
            input_shape=tuple(payload["input_shape"]),
            nam=NAMConfig(**payload["nam"]) if payload.get("nam") else None,
            history=[(n, bool(o), list(i)) for n, o, i in payload.get("pruning_history", [])],
            stripped=bool(payload.get("gates_stripped", False)),
        )
    except (KeyError, TypeError) as error:
        raise NamPruneError(f"checkpoint is missing or has a malformed field ({error}); re-save it") from None


def rebuild(record: ModelRecord) -> nn.Module:
    """The architecture a record describes, with fresh weights."""
    model = build_model(record.spec)
    if record.nam is not None:
        insert_nam(model, record.nam, record.example_input())
    if record.history:
        replay(model, record.example_input(), record.history)
    if record.stripped:
        strip_gates(model)
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, naming mismatched keys and shapes instead of dumping torch's message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                parts.append(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})")
        raise NamPruneError(f"{source} does not match the model architecture: {'; '.join(parts)}")
    model.load_state_dict(state)


def load(path: str | Path) -> nn.Module:
    """Load a nam-prune checkpoint and return the exact saved module (in eval mode)."""
    model, _ = load_with_metadata(path)
    return model


def load_with_metadata(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    payload = read_checkpoint(path)
    if not is_nam_checkpoint(payload):
        raise NamPruneError(
            f"{path} is not a nam-prune checkpoint; a plain state dict can start a run via model.weights"
        )
    model = rebuild(record_of(payload))
    load_state(model, payload["state_dict"], str(path))
    return model.eval(), payload
