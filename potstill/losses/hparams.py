"""Declared hyperparameters (default, closed range, meaning) and their validation, shared by divergences and
token selectors: errors name the owner and the field, at config load."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class HParam:
    """A hyperparameter's default, its closed range and what it does (shown by `potstill losses`)."""

    default: float
    low: float
    high: float
    doc: str


def resolve(owner: str, declared: dict[str, HParam], given: dict[str, float]) -> dict[str, float]:
    """Defaults filled in; unknown names and out-of-range values raise with a message naming the field."""
    unknown = set(given) - set(declared)
    if unknown:
        raise ValueError(f"{owner} has no hyperparameter {sorted(unknown)}; it takes: {', '.join(declared) or 'none'}")
    values = {k: float(given.get(k, hp.default)) for k, hp in declared.items()}
    for k, v in values.items():
        hp = declared[k]
        if math.isnan(v) or not hp.low <= v <= hp.high:
            raise ValueError(f"{owner}: {k}={v} is outside [{hp.low}, {hp.high}] ({hp.doc})")
    return values


def describe(declared: dict[str, HParam]) -> dict[str, dict]:
    return {k: {"default": v.default, "range": [v.low, v.high], "doc": v.doc} for k, v in declared.items()}
