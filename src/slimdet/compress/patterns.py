"""Layer patterns shared by the compression configs: ``ignore`` and ``overrides`` keys.

A pattern is a module name (which also covers that module's children) or a regular expression
matched against the whole name. The detector's output layers come from ``model.output_layers()``.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn


class LayerPatterns(BaseModel):
    """Base of the per-layer compression configs: the layers left alone, and whether the detector's
    output layers are included. Subclasses add ``overrides`` (pattern -> their per-layer setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: layers left as they are, by module name or regex
    ignore: tuple[str, ...] = ()
    #: also transform the detector's output layers (``model.output_layers()``)
    include_output_layers: bool = False

    @field_validator("ignore")
    @classmethod
    def _valid_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            check_pattern(pattern)
        return value


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` is ``pattern``, lies under it, or fully matches it as a regex."""
    return name == pattern or name.startswith(pattern + ".") or re.fullmatch(pattern, name) is not None


def check_pattern(pattern: str) -> None:
    """Raise ValueError (a pydantic validation error in a config) for a pattern that is no valid regex."""
    try:
        re.compile(pattern)
    except re.error as exc:
        msg = f"pattern {pattern!r} is neither a module name nor a valid regular expression: {exc}"
        raise ValueError(msg) from None


def output_layers(model: nn.Module) -> list[str]:
    """The detector's prediction layers (``[]`` for a module that does not name them)."""
    try:
        return list(model.output_layers())  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return []
