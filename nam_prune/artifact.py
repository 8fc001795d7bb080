"""Stage 6a: save and load models as weights-only files that never run code when read.

A saved model holds only tensors and plain values: the model spec, the NAM config, the
input shape, the channels cut from each layer and the state dict (plus recipe, metrics
and versions). Loading rebuilds the dense model, re-inserts the gates, cuts the same
channels and loads the weights, so the result is the exact saved module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from nam_prune.checkpoint import is_nam_checkpoint, read_checkpoint, write_checkpoint
from nam_prune.errors import NamPruneError
from nam_prune.models import ModelSpec, check_input, family_for, load_with_versions
from nam_prune.prune.graph import PruningHistory, replay
from nam_prune.surgery import NAMConfig, insert_nam, strip_gates


@dataclass
class ModelRecord:
    """Everything needed to rebuild a saved model, in plain values."""

    spec: ModelSpec
    input_shape: tuple[int, ...]
    nam: NAMConfig | None = None
    history: PruningHistory = field(default_factory=list)
    stripped: bool = False
    history_by_layer: bool = True
    """Format 3 on: the history is per-layer cuts; older files hold torch-pruning's group roots."""

    def example_input(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(1, *self.input_shape, device=device)


def save(
    path: Path, model: nn.Module, record: ModelRecord, state_dict: dict[str, torch.Tensor] | None = None, **extra: Any
) -> None:
    """Write a weights-only checkpoint; ``extra`` (recipe, metrics, layers) must be plain values.

    ``state_dict`` saves weights taken earlier (a snapshot) instead of the model's current ones.
    """
    state = model.state_dict() if state_dict is None else state_dict
    write_checkpoint(
        path,
        {
            "model": asdict(record.spec),
            "input_shape": list(record.input_shape),
            "nam": asdict(record.nam) if record.nam else None,
            "pruning_history": [[[name, out, list(idxs)] for name, out, idxs in step] for step in record.history],
            "gates_stripped": record.stripped,
            "state_dict": {k: v.detach().cpu() for k, v in state.items()},
            **extra,
        },
    )


def record_of(payload: dict[str, Any]) -> ModelRecord:
    """The record of a checkpoint; format 1 files predate ``nam.gate`` and hold reference gates,
    files before format 3 record their pruning by group roots."""
    try:
        return ModelRecord(
            spec=ModelSpec(**payload["model"]),
            input_shape=tuple(payload["input_shape"]),
            nam=NAMConfig(**{"gate": "reference", **payload["nam"]}) if payload.get("nam") else None,
            history=_history(payload),
            stripped=bool(payload.get("gates_stripped", False)),
            history_by_layer=payload.get("format_version", 1) >= 3,
        )
    except (KeyError, TypeError) as error:
        raise NamPruneError(f"checkpoint is missing or has a malformed field ({error}); re-save it") from error


def _history(payload: dict[str, Any]) -> PruningHistory:
    """Format 3 stores a list of steps; older files one flat list of torch-pruning's group roots."""
    stored = payload.get("pruning_history", [])
    steps = stored if payload.get("format_version", 1) >= 3 else [stored] if stored else []
    return [[(n, bool(o), list(i)) for n, o, i in step] for step in steps]


def rebuild(record: ModelRecord) -> nn.Module:
    """The architecture a record describes, with fresh weights."""
    family = family_for(record.spec.name)
    model = family.build(record.spec)
    if record.nam is not None:
        insert_nam(model, record.nam, record.example_input())
    if record.history:
        stand_ins = family.trace_stand_ins() if family.trace_stand_ins else None
        replay(model, record.example_input(), record.history, stand_ins, record.history_by_layer)
    if record.stripped:
        strip_gates(model, fold=False)  # the checkpoint's weights replace whatever a fold would give
    return model


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, naming mismatched keys and shapes instead of dumping torch's message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if names:
                parts.append(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})")
        raise NamPruneError(f"{source} does not match the model architecture: {'; '.join(parts)}")
    load_with_versions(model, state)


def load(path: str | Path) -> nn.Module:
    """Load a nam-prune checkpoint and return the exact saved module (in eval mode)."""
    model, _ = load_with_metadata(path)
    return model


def load_with_metadata(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    payload = read_checkpoint(path, how_to_trust="start a run from it (model.weights with model.trust_pickle: true)")
    if not is_nam_checkpoint(payload):
        raise NamPruneError(
            f"{path} is not a nam-prune checkpoint; a plain state dict can start a run via model.weights"
        )
    return from_payload(payload, str(path)), payload


def from_payload(payload: dict[str, Any], source: str) -> nn.Module:
    """The saved module of a nam-prune checkpoint's contents (in eval mode)."""
    model = rebuild(record_of(payload))
    load_state(model, payload["state_dict"], source)
    return model.eval()


def state_dict_of(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict, a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper
    or a whole pickled module."""
    if isinstance(payload, nn.Module):
        return payload.state_dict()
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return payload
    raise NamPruneError(f"{source} holds no state dict (a mapping of names to tensors)")


def adopt(payload: Any, source: str, name: str | None, image_size: int) -> tuple[nn.Module, ModelRecord]:
    """A model saved outside nam-prune, as a dense record: a whole pickled module as it is, a
    state dict on the architecture ``name``, its classes and input channels read from the
    classifier's and the first conv's weights."""
    if isinstance(payload, nn.Module) and name is None:
        convs = [m for m in payload.modules() if isinstance(m, nn.Conv2d)]
        heads = [m.out_features for m in payload.modules() if isinstance(m, nn.Linear)]
        spec = ModelSpec(type(payload).__name__, heads[-1] if heads else 0, convs[0].in_channels if convs else 3)
        record = ModelRecord(spec, (spec.in_channels, image_size, image_size))
        check_input(payload, spec.name, record.input_shape)
        return payload.eval(), record
    if name is None:
        raise NamPruneError(f"{source} is a plain state dict, not a nam-prune checkpoint: pass --model NAME (its architecture)")
    state = state_dict_of(payload, source)
    probe = family_for(name).build(ModelSpec(name))
    layers = [(n, m) for n, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers or f"{layers[0][0]}.weight" not in state or f"{layers[-1][0]}.weight" not in state:
        raise NamPruneError(f"{source} does not hold the weights of a {name}: check --model")
    spec = ModelSpec(name, num_classes=int(state[f"{layers[-1][0]}.weight"].shape[0]),
                     in_channels=int(state[f"{layers[0][0]}.weight"].shape[1]))
    model = family_for(name).build(spec)
    load_state(model, state, source)
    record = ModelRecord(spec, (spec.in_channels, image_size, image_size))
    check_input(model, name, record.input_shape)
    return model.eval(), record


__all__ = ["ModelRecord", "adopt", "from_payload", "load", "load_state", "load_with_metadata", "rebuild", "record_of", "save"]
