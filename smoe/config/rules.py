"""How a config field is checked: its value against its type annotation, a range, a set of choices. Every
failure is one ValueError naming the field's dotted path and the rule. No torch import (smoe.config uses these)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from typing import Any, Literal, Union


def option(default: Any, help: str) -> Any:
    """A dataclass field with its help text (the command line's flags are generated from these)."""
    return dataclasses.field(default=default, metadata={"help": help})


def fail(path: str, rule: str) -> None:
    raise ValueError(f"{path}: {rule}")


def positive(path: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0 or (isinstance(value, float) and not math.isfinite(value)):
        fail(path, f"must be a positive number, got {value!r}")


def non_negative(path: str, value: float | int) -> None:
    if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
        fail(path, f"must be >= 0, got {value!r}")


def one_of(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        fail(path, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_types(obj: Any, prefix: str) -> None:
    """Reject values whose Python type contradicts the annotation (e.g. a string where an int belongs)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue
        if not matches(value, hints[f.name]):
            fail(f"{prefix}{f.name}", f"must be of type {type_name(hints[f.name])}, got {value!r}")


def matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return isinstance(value, tuple) and all(matches(v, item) for v in value)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(h) for h in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(map(repr, typing.get_args(hint)))
    if origin is tuple:
        return f"tuple[{type_name(typing.get_args(hint)[0])}, ...]"
    if origin is list:
        return f"list[{type_name(typing.get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))
