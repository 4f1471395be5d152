"""Per-token divergences: pure functions of log-probs over the last axis, registered by name.

Every function takes ``student_logp`` (q) and ``teacher_logp`` (p), both log-probabilities of shape (..., V),
and returns per-position values of shape (...). They know nothing of masks, chunks, temperature or devices
(those live in ``chunked.py``). ``-inf`` log-probs (masked vocabulary entries) are handled: a zero-probability
entry contributes nothing, never NaN.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from potstill.registry import Registry


@dataclass(frozen=True)
class HParam:
    """A hyperparameter's default, its closed range and what it does (shown by `potstill losses`)."""

    default: float
    low: float
    high: float
    doc: str


@dataclass(frozen=True)
class DivergenceSpec:
    name: str
    fn: Callable[..., Tensor]
    hparams: dict[str, HParam] = field(default_factory=dict)
    is_divergence: bool = True  # zero on identical inputs and never negative (False for cross-entropy)
    uses_labels: bool = False  # evaluated against the one-hot data labels instead of the teacher
    doc: str = ""


DIVERGENCES: Registry[DivergenceSpec] = Registry("divergence")


def register(name: str, *, is_divergence: bool = True, uses_labels: bool = False, **hparams: HParam):
    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = [p for p in inspect.signature(fn).parameters][2:]
        if sorted(params) != sorted(hparams):
            raise TypeError(f"divergence {name!r}: signature {params} does not match declared {list(hparams)}")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        DIVERGENCES.register(name)(DivergenceSpec(name, fn, hparams, is_divergence, uses_labels, doc))
        return fn

    return add


def resolve_hparams(name: str, given: dict[str, float]) -> dict[str, float]:
    """Defaults filled in; unknown names and out-of-range values raise with a message naming the field."""
    spec = DIVERGENCES.get(name)
    unknown = set(given) - set(spec.hparams)
    if unknown:
        known = ", ".join(spec.hparams) or "none"
        raise ValueError(f"divergence {name!r} has no hyperparameter {sorted(unknown)}; it takes: {known}")
    values = {k: float(given.get(k, hp.default)) for k, hp in spec.hparams.items()}
    for k, v in values.items():
        hp = spec.hparams[k]
        if not (hp.low <= v <= hp.high) or math.isnan(v):
            raise ValueError(f"divergence {name!r}: {k}={v} is outside [{hp.low}, {hp.high}] ({hp.doc})")
    return values


def divergence(name: str, **hparams: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The registered per-token function ``fn(student_logp, teacher_logp) -> (...)`` with validated hparams."""
    spec = DIVERGENCES.get(name)
    return partial(spec.fn, **resolve_hparams(name, hparams))


def list_divergences() -> list[dict]:
    """Name, description, and hyperparameters (default and range) of every registered objective."""
    out = []
    for name in DIVERGENCES.names():
        spec = DIVERGENCES.get(name)
        hp = {k: {"default": v.default, "range": [v.low, v.high], "doc": v.doc} for k, v in spec.hparams.items()}
        out.append({"name": name, "doc": spec.doc, "hparams": hp, "target": "labels" if spec.uses_labels else "teacher"})
    return out


# ---- shared -inf-safe pieces ---------------------------------------------------------------------------------


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the last axis; entries with p = 0 contribute 0 (even where q = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def cross_entropy(logp: Tensor, logq: Tensor) -> Tensor:
    """H(p, q) = −Σ p·log q over the last axis, with 0·log 0 = 0."""
    p = logp.exp()
    return -torch.where(p > 0, p * logq, 0.0).sum(-1)


def log_mix(logp: Tensor, logq: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1−w)·q), computed in log space so that tiny probabilities do not underflow."""
    if weight_p <= 0.0:
        return logq
    if weight_p >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(weight_p), logq + math.log1p(-weight_p))


# ---- the registered objectives (formulas: ../shared/DESIGN.md, docs/objectives.md) --------------------------


@register("fkl")
def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Forward KL(p‖q): mass-covering; the classic Hinton KD objective."""
    return kl(teacher_logp, student_logp)


@register("rkl")
def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Reverse KL(q‖p): mode-seeking (MiniLLM)."""
    return kl(student_logp, teacher_logp)


@register("gjsd", beta=HParam(0.5, 0.0, 1.0, "mixture weight of the teacher; 0 = forward KL, 1 = reverse KL"))
def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """Generalized JSD(β) (GKD): β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q."""
    # At the end points the mixture collapses onto one side and the value to 0; GKD/TRL take the limits instead.
    if beta == 0.0:
        return kl(teacher_logp, student_logp)
    if beta == 1.0:
        return kl(student_logp, teacher_logp)
    logm = log_mix(teacher_logp, student_logp, beta)
    return beta * kl(teacher_logp, logm) + (1.0 - beta) * kl(student_logp, logm)


@register("ce", is_divergence=False, uses_labels=True)
def soft_cross_entropy(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Cross-entropy H(p, q) against the data labels (p is one-hot): plain next-token training."""
    return cross_entropy(teacher_logp, student_logp)
