"""Bounds of configuration options, declared beside their defaults.

A dataclass field made with :func:`option` carries its bounds (a numeric range or a set of
choices) in its metadata. :func:`validate` checks every bounded field of an instance (the library's
configs call it in ``__post_init__``); the pipeline checks a composed config against the same
metadata and names the dotted key, so each range is written once, next to its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BOUNDS = "unclip.bounds"  # the metadata key


@dataclass(frozen=True)
class Bounds:
    """A range (``ge``/``gt``/``le``/``lt``) or ``choices``; a list value is checked per element."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of bounds, or None (null is never out of bounds: it switches off)."""
        for v in value if isinstance(value, (list, tuple)) else [value]:
            why = self._scalar(v)
            if why:
                return why
        return None

    def _scalar(self, v: Any) -> str | None:
        if v is None:
            return None
        if self.choices is not None:
            return None if v in self.choices else \
                f"{v!r} is not one of {', '.join(str(c) for c in self.choices)}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None  # a rule such as embed_scale: sqrt_dim; its consumer checks it
        for bound, ok, sign in ((self.ge, lambda b: v >= b, ">="), (self.gt, lambda b: v > b, ">"),
                                (self.le, lambda b: v <= b, "<="), (self.lt, lambda b: v < b, "<")):
            if bound is not None and not ok(bound):
                return f"must be {sign} {bound}, got {v}"
        return None


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with bounds: ``steps: int = option(64, ge=1)``."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={BOUNDS: Bounds(ge, gt, le, lt, choices)})


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    return f.metadata.get(BOUNDS)


def validate(obj: Any) -> None:
    """Raise ValueError naming the first field of the dataclass instance ``obj`` out of bounds."""
    for f in dataclasses.fields(obj):
        b = bounds_of(f)
        why = b.problem(getattr(obj, f.name)) if b else None
        if why:
            raise ValueError(f"{f.name} {why}")
