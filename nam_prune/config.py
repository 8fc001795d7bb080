"""Turn untrusted YAML into typed dataclass configs, with one-line errors that say how to fix them.

Each config dataclass states its types with annotations and its ranges with
:func:`bounded`; :func:`from_dict` checks both and suggests the closest key for a typo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from nam_prune.errors import NamPruneError

T = TypeVar("T")


def bounded(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A dataclass field with a numeric range that :func:`from_dict` enforces."""
    return dataclasses.field(
        default=default, metadata={"low": low, "high": high, "low_open": low_open, "high_open": high_open}
    )


def _range_text(meta: typing.Mapping[str, Any]) -> str:
    low = "" if meta["low"] is None else f"{meta['low']} {'<' if meta['low_open'] else '<='} "
    high = "" if meta["high"] is None else f" {'<' if meta['high_open'] else '<='} {meta['high']}"
    return f"{low}value{high}"


def _check_range(key: str, value: float, meta: typing.Mapping[str, Any]) -> None:
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        raise NamPruneError(f"{key} = {value!r} is out of range: expected {_range_text(meta)}")


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def printable(text: Any) -> str:
    """Text safe for a one-line message: newlines and other control characters escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


def _float_text(text: str) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as a string; accept it as the number the user meant."""
    try:
        return float(text)
    except ValueError:
        return text


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return _coerce(key, value, options[0])
        for option in options:
            with contextlib.suppress(NamPruneError):
                return _coerce(key, value, option)
        raise NamPruneError(f"{key} must be {' or '.join(_type_name(o) for o in options)}, got {printable(repr(value))}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(hint):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(hint)], n=1)
            hint_text = f" (did you mean '{close[0]}'?)" if close else ""
            raise NamPruneError(f"{key} = {value!r} is not allowed: expected {_type_name(hint)}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise NamPruneError(f"{key} must be {_type_name(hint)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, get_args(hint)[0]) for i, item in enumerate(value)]
    if hint is float and isinstance(value, str):
        value = _float_text(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if not ok:
        raise NamPruneError(f"{key} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        raise NamPruneError(f"{key} must be a finite number, got {value!r}")
    return float(value) if hint is float else value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys, wrong types and out-of-range values."""
    section = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise NamPruneError(f"{section} must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            suggestion = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise NamPruneError(f"unknown key '{prefix}{printable(key)}' in {section}{suggestion}")
        full_key = f"{prefix}{key}"
        coerced = _coerce(full_key, value, hints[key])
        if isinstance(coerced, (int, float)) and not isinstance(coerced, bool) and fields[key].metadata:
            _check_range(full_key, coerced, fields[key].metadata)
        values[key] = coerced
    return cls(**values)

