"""Turn pydantic validation errors into short messages that name the field path and the fix.

A message reads ``steps[2].profile.batch_size: unknown key; did you mean 'batch_sizes'?``: the
path in the user's file, what is wrong, and the closest valid key. Pydantic's own text is not shown.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from slimdet.registry import closest

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "path_type": "a file path",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def join_path(parts: Sequence[str | int]) -> str:
    """``("steps", 2, "profile", "runs")`` -> ``steps[2].profile.runs``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def error_messages(exc: ValidationError, model_cls: type[BaseModel], *, prefix: Sequence[str | int] = ()) -> list[str]:
    """One ``path: problem`` line per error in ``exc`` raised while validating ``model_cls``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = join_path([*prefix, *loc]) or "(top level)"
        lines.append(f"{path}: {_describe(err, model_cls, loc)}")
    return lines


def unknown_key_message(key: str, valid: Sequence[str]) -> str:
    hint = closest(key, list(valid))
    msg = "unknown key"
    if hint:
        msg += f"; did you mean {hint!r}?"
    return msg + f" (valid keys: {', '.join(valid) if valid else 'none'})"


def _describe(err: Any, model_cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = f", got {_short(err.get('input'))}"
    if kind == "extra_forbidden":
        return unknown_key_message(str(loc[-1]), _fields_at(model_cls, loc[:-1]))
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '?')}{got}"
    if kind == "enum":
        return f"expected one of {ctx.get('expected', '?')}{got}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()), "?")
        return f"expected a value {_BOUNDS[kind]} {bound}{got}"
    if kind in ("too_short", "too_long"):
        return f"expected a list of {ctx.get('min_length', 1)} to {ctx.get('max_length', 'any')} items{got}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}{got}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", "invalid value"))
    text = str(err.get("msg", "invalid value"))
    return text[:1].lower() + text[1:] + got


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fields_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields of the (nested) model that ``loc`` points into."""
    current: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return []
        current = _inner_model(current.model_fields[part].annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``annotation`` (``Sub``, ``list[Sub]``, ``Sub | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None
