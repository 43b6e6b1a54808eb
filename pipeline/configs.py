"""Typed, frozen dataclass configs built from YAML plus ``--set key=value`` overrides.

Every stage config is a ``@dataclass(frozen=True, kw_only=True)`` whose ``__post_init__``
validates its own fields. This module only does the generic part: read YAML, apply dotted
overrides, coerce values to the annotated types, and turn every failure into a
``ConfigError`` that names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the field."""


def check(condition: bool, field: str, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ``ConfigError`` naming ``field``."""
    if not condition:
        raise ConfigError(f"config field '{field}': {message}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML scalars/lists) to a nested dict."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[leaf] = value
    return out


def build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Construct dataclass ``cls`` from plain data, coercing to the annotated field types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix or cls.__name__}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config field '{name}' (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"config section '{prefix or cls.__name__}': {e}") from None


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
         section: str | None = None) -> T:
    """YAML file (optionally one top-level section of it) + overrides -> validated ``cls``."""
    data = load_yaml(path) if path else {}
    if section is not None:
        data = data.get(section, {}) or {}
    return build(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config field '{field}': bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config field '{field}': {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, Sequence, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"config field '{field}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{field}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, prefix=f"{field}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{field}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # YAML reads 2.5e5 as a float
        raise ConfigError(f"config field '{field}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config field '{field}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config field '{field}': expected a string, got {value!r}")
    return value
