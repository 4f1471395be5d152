"""The registered cross-tokenizer terms: pure functions, like every divergence. Where they count (aligned
positions, exact matches, chunks) and how the teacher is brought to them is ``losses/aligned.py``'s business.

- ``uld`` (Boizard et al. 2024, Universal Logit Distillation): Σ_rank |q_(r) − p_(r)| with both distributions sorted
  descending and the smaller vocabulary zero-padded; the two vocabularies may differ in size.
- ``gold`` (TRL's GOLD, the hybrid): on exact matches the generalised JSD of the student and the teacher projected on
  the student's vocabulary (what this fn computes: ``matched_weight``·gjsd(β)); elsewhere ULD × ``unmatched_weight``.
- ``xproj`` (X-Token-style sparse projection): at aligned positions the divergence gjsd(β) (β = 0: forward KL, the
  default) between the student given that a chunk starts (renormalised over the ids the projection reaches) and the
  teacher's distribution projected onto the student's vocabulary (each teacher id's probability summed into the
  student id that starts the student's encoding of its bytes there; ``losses/aligned.py``, maps
  ``crosstok/projection.py``).
- ``alm`` (Minixhofer et al., Approximate Likelihood Matching; tokenkit's ``binary_ce``): the chunk log-likelihoods
  S (student) and T (teacher) binarised at temperature τ — Bernoulli(exp(T/τ − ε)) vs Bernoulli(exp(S/τ − ε)) — and
  compared with their KL. tokenkit's binary cross-entropy minus the teacher's binary entropy: the same gradient, and
  0 on identical chunks, as every divergence here. Elementwise over chunk log-likelihoods (any shape).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.divergences import generalized_jsd, register
from potstill.losses.hparams import HParam

ALM_EPSILON = 1e-6  # tokenkit's epsilon: keeps a chunk of log-likelihood 0 off the Bernoulli's boundary


def sorted_l1(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """ULD's distance over the last axis: both distributions sorted descending, the shorter padded with zeros."""
    q = student_logp.exp().sort(-1, descending=True).values
    p = teacher_logp.exp().sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


@register("uld", crosstok="aligned")
def universal_logit_distillation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """ULD: L1 between sorted probabilities (vocabularies may differ) on byte-aligned positions."""
    return sorted_l1(student_logp, teacher_logp)


@register("gold", crosstok="hybrid",
          beta=HParam(0.5, 0.0, 1.0, "gjsd's teacher weight on exact matches (0.5 = JSD as GOLD; 0 = fkl, 1 = rkl)"),
          matched_weight=HParam(1.0, 0.0, 1e3, "weight of the divergence on exact-match positions"),
          unmatched_weight=HParam(1.0, 0.0, 1e3, "weight of ULD on the other aligned positions"))
def gold_hybrid(student_logp: Tensor, teacher_logp: Tensor, beta: float, matched_weight: float,
                unmatched_weight: float) -> Tensor:
    """GOLD-like hybrid: gjsd(β) on exact-match tokens (vocabularies mapped by piece), ULD on the other aligned ones."""
    # The exact-match branch, the teacher already on the student's vocabulary; the ULD branch is losses/aligned.py's.
    del unmatched_weight
    return matched_weight * generalized_jsd(student_logp, teacher_logp, beta)


@register("xproj", crosstok="projected",
          beta=HParam(0.0, 0.0, 1.0, "gjsd's teacher weight against the projected teacher (0 = fkl, 0.5 = JSD, 1 = rkl)"))
def projected_divergence(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """gjsd(β) (default fkl) to the teacher projected onto the student's vocabulary at byte-aligned positions."""
    # teacher_logp is already the projected distribution over the student's ids (losses/aligned.py)
    return generalized_jsd(student_logp, teacher_logp, beta)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of log ½ (as tokenkit)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("alm", crosstok="chunk",
          tau=HParam(100.0, 1e-3, 1e6, "binarisation temperature: chunk log-likelihoods are divided by it (tokenkit: 100)"))
def approximate_likelihood_matching(student_logp: Tensor, teacher_logp: Tensor, tau: float) -> Tensor:
    """ALM: binarised KL of teacher vs student chunk likelihoods on chunks whose byte boundaries coincide (T = 1)."""
    # Here student_logp / teacher_logp are chunk log-likelihoods (log q(chunk), log p(chunk)), elementwise.
    a = teacher_logp.clamp_max(0) / tau - ALM_EPSILON
    b = student_logp.clamp_max(0) / tau - ALM_EPSILON
    p = a.exp()
    # a chunk the teacher gives probability 0 (a = -inf) adds nothing on its 'yes' side, even where b = -inf too
    # (-inf − -inf would be NaN; torch.where passes a zero gradient into the unselected branch, as in ``kl``)
    yes = p * torch.where(p != 0, a - b, torch.zeros((), dtype=p.dtype, device=p.device))
    return yes + (-torch.expm1(a)) * (log1mexp(a) - log1mexp(b))
