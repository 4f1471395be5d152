"""Reading a run config: YAML text and ``section.key=value`` overrides into typed dataclasses.

Unknown keys fail with a "did you mean" naming the source; values are coerced to the field's type (numbers as
people write them: 3e-4, 1e3) with an error naming the key; YAML syntax errors become one line with file:line.
Attribute docstrings (the string literal after each field) are read from the source as the ``--help`` text.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from functools import cache
from typing import Any

import yaml

from potstill.registry import did_you_mean


def apply_override(raw: dict, item: str) -> None:
    """``section.key=value`` (value parsed as YAML) into the nested dict ``raw``."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r}: write it as section.key=value, e.g. train.max_steps=50")
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is a value, not a section")
    node[leaf] = parse_yaml(value, f"override {item!r}") if value.strip() else None


def parse_yaml(text: str, where: str) -> Any:
    """YAML text; a syntax error becomes one line naming ``where`` (file:line) and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None and not where.startswith("override") else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{where}{line}: invalid YAML ({' '.join(problem.split())})") from None


def build(cls: type, raw: Any, source: str, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a dict, recursing into sections; errors name ``source`` and the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: section {prefix.rstrip('.') or 'top level'!r} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ValueError(f"{source}: unknown config key {prefix + str(key)!r}.{did_you_mean(str(key), fields)} "
                             f"Known here: {', '.join(fields)}")
        kwargs[key] = coerce(hints[key], value, source, prefix + key)
    return cls(**kwargs)


def coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, source, key + ".")
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    given = value
    numeric = int in options or float in options
    if numeric and isinstance(value, str) and str not in options and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 and 1e3 as strings; a numeric field wants the number
    for opt in options:
        if opt is bool and isinstance(value, bool):
            return value
        if opt in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            if opt is int and float(value) != int(value):
                continue
            return opt(value)
        if opt is str and isinstance(value, bool):  # YAML reads `false` as a bool; a str field wants its text
            return str(value).lower()
        if opt is str and isinstance(value, (str, int, float)):
            return str(value)
        if opt is dict and isinstance(value, dict):
            return value
        if opt is list and isinstance(value, list):
            return value
    whole = " (a whole number)" if options == (int,) or options == (int, type(None)) else ""
    raise ValueError(f"{source}: config key {key!r} expects {_type_name(hint)}{whole}, got {given!r}")


# A decimal number as people write it: 3e-4, 1e3, 1.5E+2, -.5 (not inf/nan, which no numeric option wants).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _type_name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,)))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs
