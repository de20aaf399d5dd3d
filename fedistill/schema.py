"""Typed-config machinery: field ranges as dataclass metadata, one-line refusals.

A schema is a frozen dataclass whose fields carry their type (the annotation) and, in
``field(metadata=...)``, the range they accept (:func:`check`, :func:`at_least`,
:func:`above`, :func:`choice`). :func:`build` checks a composed config's values against a
schema and returns the typed view; the first bad value raises :class:`ConfigError` with a
message made by :func:`refusal`: ``key=value: problem; fix``. The schemas themselves live in
:mod:`fedistill.config`. No Hydra, Flower or torch here.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

__all__ = [
    "ConfigError",
    "above",
    "at_least",
    "build",
    "check",
    "check_value",
    "choice",
    "refusal",
    "shown",
    "type_ok",
]


class ConfigError(ValueError):
    """A composed config has a value of the wrong type or out of range (one-line message)."""


def shown(value: Any) -> str:
    """A value as the user would type it in an override (``null``, ``true``, ``0.2``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value) if isinstance(value, int | float | str) else repr(value)
    return text.replace("\n", "\\n")


def refusal(key: str, value: Any, problem: str, fix: str = "") -> ConfigError:
    """The error for ``key=value``: ``key=value: problem; fix`` (one line; no fix part when ``fix`` is empty)."""
    return ConfigError(f"{key}={shown(value)}: {problem}" + (f"; {fix}" if fix else ""))


def check(allowed: str, ok: Callable[[Any], bool], example: Any) -> dict[str, Any]:
    """Field metadata: the range ``ok`` accepts, described as ``allowed``, and an example value."""
    return {"allowed": allowed, "ok": ok, "example": example}


def at_least(low: float, example: Any) -> dict[str, Any]:
    """Field metadata: a value ``>= low``."""
    return check(f">= {low}", lambda v: v >= low, example)


def above(low: float, example: Any) -> dict[str, Any]:
    """Field metadata: a value ``> low``."""
    return check(f"> {low}", lambda v: v > low, example)


def choice(options: tuple[str, ...]) -> dict[str, Any]:
    """Field metadata: one of ``options`` (the first is the example)."""
    return check(f"one of {', '.join(options)}", lambda v: v in options, options[0])


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def type_ok(value: Any, tp: type) -> bool:
    """Whether ``value`` has config type ``tp`` (an int is a float; a bool is never an int)."""
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is float:
        return isinstance(value, int | float)
    return isinstance(value, tp)


def check_value(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` of config key ``key`` checked against its type ``hint`` and range ``meta``.

    Returns
    -------
    Any
        The value (a float field's int as a float).

    Raises
    ------
    ConfigError
        ``key=value: key must be <type> <range>; e.g. key=<example>``.
    """
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    nullable = type(None) in args
    tp = next(a for a in args if a is not type(None))
    if value is None and nullable:
        return None
    allowed = _TYPE_WORDS[tp] + (f" {meta['allowed']}" if "allowed" in meta and tp is not str else "")
    if tp is str and "allowed" in meta:
        allowed = meta["allowed"]
    if nullable:
        allowed += " or null"
    if not (type_ok(value, tp) and ("ok" not in meta or meta["ok"](value))):
        example = meta.get("example", "null" if nullable else (True if tp is bool else None))
        fix = f"e.g. {key}={shown(example)}" if example is not None else ""
        raise refusal(key, value, f"{key} must be {allowed}", fix)
    return float(value) if tp is float else value


def build(schema: type, values: Any, prefix: str, command: str) -> Any:
    """The typed view of ``values`` (a config group at ``prefix``) as dataclass ``schema``, every field checked.

    Raises
    ------
    ConfigError
        For a group given a single value, a missing key or the first bad value.
    """
    where = prefix.rstrip(".") or command
    if not isinstance(values, Mapping):
        raise refusal(where, values, f"{where} must be a group of keys, not a single value")
    hints = typing.get_type_hints(schema)
    kwargs: dict[str, Any] = {}
    for f in fields(schema):
        key = prefix + f.name
        if f.name not in values:
            raise ConfigError(f"{key} is missing from the {command} config; set it, e.g. +{key}=...")
        hint = hints[f.name]
        if is_dataclass(hint):
            kwargs[f.name] = build(hint, values[f.name], key + ".", command)
        else:
            kwargs[f.name] = check_value(key, values[f.name], hint, f.metadata)
    return schema(**kwargs)
