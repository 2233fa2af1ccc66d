"""Frozen-dataclass configs: strict overrides, dict/JSON/YAML round trips, dotted CLI overrides.

Configs fail loudly (STYLE.md 10): an unknown key is an error naming the known ones; a wrong
value type is an error naming the key. Both are `ldm.errors.UserError`.

Numbers are read as people write them: PyYAML (YAML 1.1) reads ``3e-4`` and ``1e-6`` as strings
(its float pattern needs a dot), so a float field also takes a string that Python's ``float``
reads (``3e-4``, ``1_000.5``), and an int field one that ``int`` reads (``1_000``) or a
whole number in exponent form (``1e5``). Booleans are never numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ldm.errors import UserError

T = TypeVar("T")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_NUMBER = re.compile(r"[+-]?(\d[\d_]*)?(\.[\d_]*)?([eE][+-]?\d+)?")


def _number(tp: type, text: str) -> int | float:
    """A number written as text (``3e-4``, ``1_000``, ``1e5`` for an int); TypeError otherwise."""
    t = text.strip()
    if t and _NUMBER.fullmatch(t) and any(c.isdigit() for c in t):
        value = float(t)
        if tp is float:
            return value
        try:
            return int(t)
        except ValueError:
            if value.is_integer():
                return int(value)
    raise TypeError(f"expected {tp.__name__}, got {text!r} (str)")


def _coerce(tp: Any, value: Any) -> Any:
    """Turn JSON/YAML values back into the annotated type (lists -> tuples, dicts -> dataclasses)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, (dict, tp)):
            raise TypeError(f"expected a section of {tp.__name__} keys ({', '.join(_field_names(tp))}), got {value!r}")
        return from_dict(tp, value) if isinstance(value, dict) else value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"expected {tp}, got {value!r}")
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args:
            if len(args) != len(value):
                raise TypeError(f"expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is dict and isinstance(value, dict):
        return {k: _coerce(args[1], v) for k, v in value.items()} if args else dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        return _number(tp, value)
    if tp is tuple and isinstance(value, list):
        return tuple(value)
    if tp in (int, float, bool, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise TypeError(f"expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    if origin in (tuple, list, dict) and not isinstance(value, (tuple, list, dict)):
        raise TypeError(f"expected {tp}, got {value!r} ({type(value).__name__})")
    return value


def _coerced(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every value turned into its field's annotated type; a wrong type is an error
    naming the key."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        try:
            out[k] = _coerce(hints[k], v)
        except TypeError as e:
            raise UserError(f"{cls.__name__}.{k}: {e}") from None
    return out


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from a dict; unknown keys are an error."""
    names = _field_names(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise UserError(f"unknown key(s) {unknown} for {cls.__name__}; known keys: {names}")
    missing = _missing(cls, data)
    if missing:
        raise UserError(f"{cls.__name__} needs {missing} (no default)")
    return cls(**_coerced(cls, data))


def _missing(cls: type, data: dict[str, Any]) -> list[str]:
    """Fields of ``cls`` without a default that ``data`` does not give."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in data
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def replace(cfg: T, **overrides: Any) -> T:
    """``dataclasses.replace`` with a clear error for unknown keys and type coercion."""
    names = _field_names(type(cfg))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"unknown override(s) {unknown} for {type(cfg).__name__}; known keys: {names}")
    return dataclasses.replace(cfg, **_coerced(type(cfg), overrides))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's contents (sha256 of its sorted JSON)."""
    blob = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_value(text: str) -> Any:
    """Parse a CLI override value with YAML rules (``3`` -> int, ``[1,2]`` -> list, ``bf16`` -> str)."""
    return yaml.safe_load(text)


def apply_dotted(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy). Unknown keys are caught later by
    ``from_dict``; here a path through a non-dict is an error."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {p!r} is not a section")
        node[last] = parse_value(value)
    return data


def load_yaml(path: str | Path | None, cls: type[T], overrides: list[str] = (),
              values: dict[str, Any] | None = None) -> T:
    """``cls`` from a YAML file (none: the defaults), then ``values`` (top-level keys, e.g. the
    command-line flags a user gave), then dotted ``overrides`` (``a.b=value``); strict
    (`UserError` naming the file)."""
    return from_dict(cls, read_config(path, overrides, values))


def resolved_yaml(path: str | Path | None, cls: type, overrides: list[str] = (),
                  values: dict[str, Any] | None = None) -> str:
    """What ``load_yaml`` builds, as YAML (``--print-config``), after the same checks. Required
    text keys not given yet (a recipe leaves ``data`` to the command line) print as null under a
    comment naming them; any other missing key is the error ``load_yaml`` raises."""
    data = read_config(path, overrides, values)
    hints = typing.get_type_hints(cls)
    unset = [k for k in _missing(cls, data) if hints[k] is str]
    out = to_dict(from_dict(cls, {**data, **{k: "" for k in unset}}))
    out.update({k: None for k in unset})
    note = f"# not set, required to run: {', '.join(unset)}\n" if unset else ""
    text = yaml.safe_dump(out, sort_keys=False, default_flow_style=None)
    if text.startswith("{"):  # a config of scalars only: one key per line all the same
        text = yaml.safe_dump(out, sort_keys=False, default_flow_style=False)
    return f"# {cls.__name__} resolved from {path or 'the defaults'}\n{note}{text}"


def read_config(path: str | Path | None, overrides: list[str] = (),
                values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged settings ``load_yaml`` builds from: the YAML file's mapping, ``values`` over it,
    dotted ``overrides`` over both (not yet checked against a class)."""
    if path is None:
        return apply_dotted(dict(values or {}), list(overrides))
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return apply_dotted({**data, **(values or {})}, list(overrides))
