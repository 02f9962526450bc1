"""Turn raw values (YAML/JSON scalars, flag strings) into a field's declared type."""

from __future__ import annotations

import math
import typing
from types import UnionType
from typing import Any

from ..core.errors import preview
from .arith import parse_int_expression

MAX_INT = 2**53
_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}
_NONE = {"none", "null", "~", ""}
# Enum-like fields are compared in lower case so that `attn: GQA` works.
LOWERCASE_FIELDS = {"attn", "pos_emb", "norm", "non_linearity", "dtype"}
# Fields that take an arithmetic expression as well as a number.
EXPRESSION_FIELDS = {"total_batch_size"}


class CoercionError(ValueError):
    pass


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for `int`, `int | None`, `Optional[int]`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _show(value: Any) -> str:
    return preview(value)  # never renders more than a few dozen characters of the value


def coerce(name: str, annotation: Any, value: Any) -> Any:
    """`value` as the field's type, or CoercionError with a message for the user."""
    base, optional = _base_type(annotation)
    if value is None or (isinstance(value, str) and optional and value.strip().lower() in _NONE):
        if optional:
            return None
        raise CoercionError(f"expected {_type_name(base)}, got null")
    if base is bool:
        return _to_bool(value)
    if base is int:
        return _to_int(name, value)
    if base is float:
        return _to_float(value)
    if base is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise CoercionError(f"expected a string, got {_show(value)}")
        text = str(value)
        return text.strip().lower() if name in LOWERCASE_FIELDS else text
    raise CoercionError(f"unsupported field type {annotation!r}")  # pragma: no cover


def _type_name(base: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        base, str(base))


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise CoercionError(f"expected true or false, got {_show(value)}")


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise CoercionError(f"expected an integer, got {_show(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise CoercionError(f"expected an integer, got {_show(value)}")
        value = int(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            if name in EXPRESSION_FIELDS:
                try:
                    value = parse_int_expression(text)
                except ValueError as err:
                    raise CoercionError(str(err)) from None
            else:
                try:
                    as_float = float(text)
                except ValueError:
                    raise CoercionError(f"expected an integer, got {_show(value)}") from None
                if not math.isfinite(as_float) or not as_float.is_integer():
                    raise CoercionError(f"expected an integer, got {_show(value)}") from None
                value = int(as_float)
    elif not isinstance(value, int):
        raise CoercionError(f"expected an integer, got {_show(value)}")
    if abs(value) > MAX_INT:
        raise CoercionError(f"{_show(value)} is too large")
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CoercionError(f"expected a number, got {_show(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise CoercionError(f"expected a number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise CoercionError(f"expected a finite number, got {_show(value)}")
    return number
