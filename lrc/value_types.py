"""Checking setting values against their declared Python types, so a recipe's `sequential: "no"` is an error.

YAML gives bool, int, float, str, None, lists and mappings; a field declared `bool` takes only a bool, `int`
only an int (not a bool), `float` an int or a float (not a bool), `str` only a string, `X | None` None or an
X, `list[X]` a list of X, `dict[str, X]` a mapping with string keys and X values, `Any` anything.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError


def type_name(annotation: Any) -> str:
    """A readable name of a type annotation: 'bool', 'list of str', 'int or null', ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return "anything"
    if annotation is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}s" if args else "list"
    if origin is dict:
        return "mapping of names to values" if args and args[0] is str else "mapping"
    if annotation is float:
        return "number"
    if annotation is int:
        return "integer"
    if annotation is bool:
        return "boolean (true or false)"
    if annotation is str:
        return "string"
    return getattr(annotation, "__name__", str(annotation))


def matches(value: Any, annotation: Any) -> bool:
    """Whether `value` is of the type `annotation` describes (see the module docstring)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        key_type, value_type = args if args else (Any, Any)
        return all(matches(k, key_type) and matches(v, value_type) for k, v in value.items())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this checker does not model (none in lrc today) is not second-guessed


def check_value(key: str, value: Any, annotation: Any, where: str = "") -> None:
    """Raise ConfigError naming `key` when `value` is not of type `annotation`."""
    if not matches(value, annotation):
        place = f" {where}" if where else ""
        hint = ""
        if isinstance(value, str) and (matches(1.0, annotation) or matches(1, annotation)) and _is_number(value):
            quirk = isinstance(yaml.safe_load(value), str)  # PyYAML reads 1e-3 (no decimal point) as a string
            hint = f" (YAML reads {value} as a string: write {float(value)!r})" if quirk else " (remove the quotes)"
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 60 and matches("", annotation):
            hint = " (YAML reads an unquoted N:M as a base-60 number, 2:4 as 124: quote it)"
        raise ConfigError(
            f"{key}{place} must be {_article(type_name(annotation))}, got {value!r} ({_yaml_name(value)}){hint}"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_fields(cls: type, values: dict[str, Any], where: str = "") -> None:
    """check_value for every `values` key that is an init field of dataclass `cls` (others are left to the caller)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init and f.name in values:
            check_value(f.name, values[f.name], hints[f.name], where)


def _article(name: str) -> str:
    return name if name.startswith(("null", "anything")) else ("an " if name[0] in "aeiou" else "a ") + name


def _yaml_name(value: Any) -> str:
    """What the value is called in YAML: a string, an integer, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
