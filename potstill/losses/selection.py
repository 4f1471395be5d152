"""Token selection and weighting, one mechanism for every objective.

A no-grad pass over the same chunks computes per-token statistics (``TokenStats``) from the student's and the
teacher's distributions at T = 1; a registered selector turns them into per-token weights (N,). Weights are
rescaled to average 1 over the labelled tokens of the batch, so the loss keeps its scale (a kept fraction k
gives kept tokens weight 1/k — the mean over kept tokens) and the loop's division by the labelled-token count
keeps gradient accumulation exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.divergences import kl
from potstill.losses.hparams import HParam, resolve
from potstill.registry import Registry


@dataclass
class TokenStats:
    """Per-position statistics (N,) at T = 1; ``valid`` marks labelled positions."""

    valid: Tensor
    student_entropy: Tensor
    teacher_entropy: Tensor
    kl_teacher_student: Tensor  # KL(p‖q)
    student_label_prob: Tensor  # q(y)
    teacher_label_prob: Tensor  # p(y)
    student_nll: Tensor  # −log q(y)
    reference_nll: Tensor | None = None  # −log r(y) of a reference model (AdaSPEC)


@dataclass(frozen=True)
class SelectorSpec:
    name: str
    fn: Callable[..., Tensor]  # (stats, **hparams) -> raw weights (N,) ≥ 0
    hparams: dict[str, HParam]
    needs_reference: bool
    doc: str


SELECTORS: Registry[SelectorSpec] = Registry("token selector")


def register_selector(name: str, *, needs_reference: bool = False, **hparams: HParam):
    def add(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        SELECTORS.register(name)(SelectorSpec(name, fn, hparams, needs_reference, doc))
        return fn

    return add


@torch.no_grad()
def compute_token_stats(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> TokenStats:
    """Statistics of one chunk: logits (n, V) fp32, labels (n,) with -100 = unlabelled."""
    logq, logp = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    safe = labels.clamp_min(0)[:, None]
    entropy = lambda logx: -torch.where(logx.exp() > 0, logx.exp() * logx, 0.0).sum(-1)  # noqa: E731
    return TokenStats(
        valid=labels != -100,
        student_entropy=entropy(logq),
        teacher_entropy=entropy(logp),
        kl_teacher_student=kl(logp, logq),
        student_label_prob=logq.gather(-1, safe).squeeze(-1).exp(),
        teacher_label_prob=logp.gather(-1, safe).squeeze(-1).exp(),
        student_nll=-logq.gather(-1, safe).squeeze(-1),
    )


def concat_stats(parts: list[TokenStats]) -> TokenStats:
    fields = TokenStats.__dataclass_fields__
    return TokenStats(**{f: None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts]) for f in fields})


def top_fraction(score: Tensor, valid: Tensor, keep: float) -> Tensor:
    """1 for the ⌈keep·n⌉ labelled positions with the largest score, else 0 (ties broken by position)."""
    n = int(valid.sum())
    k = min(n, max(1, round(keep * n))) if n else 0
    out = torch.zeros_like(score)
    if k:
        masked = torch.where(valid, score, torch.tensor(float("-inf"), device=score.device))
        out[masked.topk(k).indices] = 1.0
    return out


def selection_weights(stats: TokenStats, name: str, hparams: dict[str, float]) -> Tensor:
    """Registered selector → weights (N,) that are 0 off the labelled positions and average 1 on them."""
    raw = SELECTORS.get(name).fn(stats, **hparams).float() * stats.valid
    total = raw.sum()
    n = stats.valid.sum()
    return raw * (n / total) if total > 0 else raw


# ---- registered selectors ------------------------------------------------------------------------------------


@register_selector("entropy", keep=HParam(0.5, 0.0, 1.0, "fraction of labelled tokens kept"))
def by_student_entropy(stats: TokenStats, keep: float) -> Tensor:
    """Keep the tokens where the student is most uncertain (highest entropy)."""
    return top_fraction(stats.student_entropy, stats.valid, keep)


@register_selector("divergence", keep=HParam(0.5, 0.0, 1.0, "fraction of labelled tokens kept"))
def by_divergence(stats: TokenStats, keep: float) -> Tensor:
    """Keep the tokens where KL(teacher‖student) is largest."""
    return top_fraction(stats.kl_teacher_student, stats.valid, keep)
