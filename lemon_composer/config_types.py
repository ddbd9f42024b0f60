"""Type checks of yaml values against the annotations of the class they configure.

OmegaConf hands our components whatever the yaml or the command line said (``eta: abc`` is the
string "abc"); without this a wrong type surfaces as a Python comparison error deep inside, or
not at all. Each error names the yaml key, the value and the expected type.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if origin in (Sequence, list, tuple):
        return f"a list of {plural.get(args[0], _describe(args[0]))}" if args else "a list"
    if origin in (Mapping, dict):
        return f"a mapping to {plural.get(args[1], _describe(args[1]))}" if args else "a mapping"
    return getattr(hint, "__name__", str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Whether a yaml value fits ``hint`` (ints pass as floats; bools are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (Sequence, list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(matches(v, args[0]) for v in value))
    if origin in (Mapping, dict):
        return isinstance(value, Mapping) and (not args or all(matches(v, args[1]) for v in value.values()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not model: left to the class


def check_types(values: Mapping[str, Any], hints: Mapping[str, Any], key: str) -> None:
    """ValueError ``<key>.<name>=<value>: expected <type>`` for the first value that does not fit."""
    for name, value in values.items():
        if name in hints and not matches(value, hints[name]):
            raise ValueError(f"{key + '.' if key else ''}{name}={value!r}: expected {_describe(hints[name])}")


def check_arguments(cls: type, values: Mapping[str, Any] | None, key: str) -> None:
    """Unknown, missing and wrongly typed constructor arguments of ``cls``, named by yaml ``key``
    (``""`` for a top-level config, whose keys are then named alone)."""
    values = dict(values or {})
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"{key or cls.__name__}: unknown keys {unknown}; accepted: {sorted(params)}")
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in values)
    if missing:
        raise ValueError(f"{key or cls.__name__}: missing required keys {missing}")
    check_types(values, typing.get_type_hints(cls.__init__), key)


def check_section(cls: type, values: Mapping[str, Any], *, key: str, owner: str, required: Sequence[str],
                  nested: Sequence[str] = ()) -> None:
    """A yaml section for dataclass ``cls`` (e.g. ``model:`` of ``owner``): unknown keys, missing
    ``required`` keys, and the types of every field but the ``nested`` sections (checked by the caller)."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown} for {owner}; accepted: {sorted(known)}")
    for name in required:
        if name not in values:
            raise ValueError(f"{key}.{name} is required for {owner}")
    check_types({k: v for k, v in values.items() if k not in nested}, typing.get_type_hints(cls), key)
