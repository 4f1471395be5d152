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

from potstill.labels import IGNORE_INDEX
from potstill.losses.divergences import entropy, kl, label_logprob
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
    teacher_nll: Tensor  # −log p(y)
    reference_kl: Tensor | None = None  # KL(p‖r) of a reference model r (AdaSPEC)
    sequence: Tensor | None = None  # (N,) the sequence (batch row) of each position; a row's positions are contiguous


@dataclass(frozen=True)
class SelectorSpec:
    name: str
    fn: Callable[..., Tensor]  # (stats, **hparams) -> raw weights (N,) ≥ 0
    hparams: dict[str, HParam]
    needs_reference: bool
    doc: str
    needs_sequences: bool = False  # sums along each batch row (refused with data.packing: a row holds several)


SELECTORS: Registry[SelectorSpec] = Registry("token selector")


def register_selector(name: str, *, needs_reference: bool = False, needs_sequences: bool = False, **hparams: HParam):
    def add(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        SELECTORS.register(name)(SelectorSpec(name, fn, hparams, needs_reference, doc, needs_sequences))
        return fn

    return add


@torch.no_grad()
def compute_token_stats(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                        reference_logits: Tensor | None = None) -> TokenStats:
    """Statistics of one chunk: logits (n, V) fp32, labels (n,) with -100 = unlabelled."""
    logq, logp = F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1)
    reference_kl = None if reference_logits is None else kl(logp, F.log_softmax(reference_logits, -1))
    student_label_logp, teacher_label_logp = label_logprob(logq, labels), label_logprob(logp, labels)
    return TokenStats(
        valid=labels != IGNORE_INDEX,
        student_entropy=entropy(logq),
        teacher_entropy=entropy(logp),
        kl_teacher_student=kl(logp, logq),
        student_label_prob=student_label_logp.exp(),
        teacher_label_prob=teacher_label_logp.exp(),
        student_nll=-student_label_logp,
        teacher_nll=-teacher_label_logp,
        reference_kl=reference_kl,
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


@register_selector("entropy", keep=HParam(0.2, 0.0, 1.0, "fraction of labelled tokens kept (SE-KD: 0.2)"))
def by_student_entropy(stats: TokenStats, keep: float) -> Tensor:
    """Keep the tokens where the student is most uncertain (highest entropy; SE-KD, Tavor et al. 2025)."""
    return top_fraction(stats.student_entropy, stats.valid, keep)


@register_selector("divergence", keep=HParam(0.5, 0.0, 1.0, "fraction of labelled tokens kept"))
def by_divergence(stats: TokenStats, keep: float) -> Tensor:
    """Keep the tokens where KL(teacher‖student) is largest."""
    return top_fraction(stats.kl_teacher_student, stats.valid, keep)


@register_selector("tip", keep=HParam(0.2, 0.0, 1.0, "fraction of the low-entropy half kept, by divergence"),
                   high_entropy=HParam(1.0, 0.0, 1.0, "1: also keep the high-entropy half; 0: only the overconfident-and-wrong set"))
def by_entropy_and_divergence(stats: TokenStats, keep: float, high_entropy: float) -> Tensor:
    """TIP (Xu et al. 2026): high-entropy tokens plus low-entropy, high-divergence ('overconfident and wrong') ones."""
    # Our reading of the paper's abstract: the entropy split is the batch median of the student's entropy; the
    # Q3 set is the top `keep` fraction of the low-entropy half by KL(teacher‖student). Thresholds are tunable.
    low = stats.valid & (stats.student_entropy < stats.student_entropy[stats.valid].median()) if stats.valid.any() else stats.valid
    overconfident_wrong = top_fraction(stats.kl_teacher_student, low, keep)
    return torch.maximum(overconfident_wrong, (stats.valid & ~low).float() * (high_entropy >= 0.5))


@register_selector("tsd")
def by_relative_confidence(stats: TokenStats) -> Tensor:
    """TSD-KD (Kim & Baek 2026): soft weight σ(H(q) − H(p)): more weight where the student is less sure than the teacher."""
    return torch.sigmoid(stats.student_entropy - stats.teacher_entropy)


@register_selector("reference", needs_reference=True, keep=HParam(0.4, 0.0, 1.0, "fraction of labelled tokens kept (AdaSPEC: 0.4)"))
def by_reference_gap(stats: TokenStats, keep: float) -> Tensor:
    """AdaSPEC (Hu et al. 2025): keep tokens with the largest KL(p‖q) − KL(p‖r) against a reference model r."""
    if stats.reference_kl is None:
        raise ValueError("token selector 'reference' needs loss.reference (a reference model)")
    return top_fraction(stats.kl_teacher_student - stats.reference_kl, stats.valid, keep)


def prefix_sums(values: Tensor, sequence: Tensor) -> tuple[Tensor, Tensor]:
    """Per position, the sum of ``values`` over the earlier positions of its sequence, and over its whole sequence
    (both (N,), fp64 sums); ``sequence`` (N,) numbers contiguous runs of positions in order."""
    inclusive = values.double().cumsum(0)
    before_all = inclusive - values.double()  # Σ over every earlier position, nondecreasing (values ≥ 0)
    n_seq = int(sequence.max()) + 1 if sequence.numel() else 0
    start = torch.full((n_seq,), float("inf"), dtype=torch.float64, device=values.device)
    start = start.scatter_reduce(0, sequence, before_all, "amin")  # the sum before each sequence's first position
    totals = torch.zeros(n_seq, dtype=torch.float64, device=values.device).index_add_(0, sequence, values.double())
    return before_all - start[sequence], totals[sequence]


@register_selector("iw_opd", needs_sequences=True, gamma=HParam(0.5, 0.0, 100.0, "extra weight of a sequence's first token over its last (IW-OPD: 0.5)"))
def by_prefix_discrepancy(stats: TokenStats, gamma: float) -> Tensor:
    """IW-OPD (Xie et al. 2026): 1 + γ·(1 − Σ_{k<t}|A_k| / Σ_k |A_k|) per sequence, A = log p(y) − log q(y)."""
    # As TRL's IWOPDTrainer: the unsigned advantages of the labelled tokens are summed along each sequence, so
    # tokens after the student has drifted from the teacher weigh less (1 + γ at the start, 1 at the end).
    # Differences: A uses the student's log q(y) at T = 1 (TRL: the sampler's, equal on-policy at T = 1), and the
    # weights are rescaled to mean 1 over the micro-batch like every selector's (TRL divides by the token count).
    if stats.sequence is None:
        raise ValueError("token selector 'iw_opd' needs the batch's sequences: give fused_loss (B, T, H) hidden states")
    gap = torch.where(stats.valid, (stats.teacher_nll - stats.student_nll).abs(), torch.zeros_like(stats.student_nll))
    before, total = prefix_sums(gap, stats.sequence)
    return (1.0 + gamma * (1.0 - before / total.clamp_min(1e-8))).float()
