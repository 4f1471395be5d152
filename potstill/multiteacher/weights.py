"""Mixture weights for multi-teacher KD: pure functions on tensors, one per teachers.mix mode.

Every mode is the configured (fixed) weights w0 (K,) times a per-example factor, renormalised to sum to 1:

- fixed: w = w0.
- route: w = one-hot of the record's teacher (w0 is not used).
- confidence: w ∝ w0 · exp(c_k), c_k = teacher k's mean log-prob of the example's labelled tokens (at the run's
  temperature): a softmax over teachers of log w0 + c, i.e. w0 times each teacher's per-token geometric-mean
  likelihood of the example. An example without labelled tokens has c = 0 (w = w0).
- correctness: w ∝ w0 · [teacher k's answer is right]; an example no teacher with w0 > 0 answers right, and one
  that is not checkable, keeps w0.
- ddk: w ∝ w0 · r[d], r (D, K) the domain factors of the example's domain d (``ddk_update``).

Per-example weights (E, K) then become per-position log-weights (N, K) by the batch's segment table
(``position_log_weights``), so packed rows get each document's own weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def normalised(weights: Tensor) -> Tensor:
    """Rows of non-negative weights (..., K) scaled to sum to 1 (rows must have a positive entry)."""
    return weights / weights.sum(-1, keepdim=True)


def fixed_weights(base: Tensor, n: int) -> Tensor:
    """(n, K): the normalised configured weights for every example."""
    return normalised(base).expand(n, -1).clone()


def route_weights(teacher_index: Tensor, k: int) -> Tensor:
    """(E, K) one-hot rows: each example's whole weight on its routed teacher."""
    return F.one_hot(teacher_index.long(), k).float()


def confidence_weights(base: Tensor, mean_logp: Tensor) -> Tensor:
    """(E, K) = softmax_k(log w0_k + mean_logp[e, k]): w0 times exp(mean label log-prob), renormalised."""
    return torch.softmax(base.log()[None, :] + mean_logp, -1)


def correctness_weights(base: Tensor, correct: Tensor, checkable: Tensor) -> Tensor:
    """(E, K): w0 restricted to the teachers that answered right (``correct`` (E, K) bool), renormalised; rows that
    are not ``checkable`` (E,) or where no teacher with weight > 0 is right keep w0."""
    kept = base[None, :] * correct.float()
    fallback = ~checkable | (kept.sum(-1) == 0)
    return normalised(torch.where(fallback[:, None], base[None, :].expand_as(kept), kept))


def ddk_update(factors: Tensor, student_ce: Tensor, teacher_ce: Tensor, alpha: float) -> Tensor:
    """DDK's domain discrepancy factor with its factor smoothing, taken over teachers within each domain:
    r ← α·softmax_k(log r[d, k] + CE_student[d] / CE_k[d]) + (1 − α)/K. factors (D, K), student_ce (D,),
    teacher_ce (D, K): mean held-out CE per labelled token. The larger the student's loss relative to teacher k's on
    domain d, the more weight k gets there; (1 − α)/K keeps every teacher in play."""
    k = factors.shape[-1]
    psi = torch.softmax(factors.log() + student_ce[:, None] / teacher_ce, -1)
    return alpha * psi + (1 - alpha) / k


def ddk_weights(base: Tensor, factors: Tensor, domain_index: Tensor) -> Tensor:
    """(E, K): w0 times the factors of each example's domain, renormalised."""
    return normalised(base[None, :] * factors[domain_index])


def example_positions(segments: Tensor, shape: tuple[int, int]) -> Tensor:
    """(R·P,) the batch example each predicted position belongs to (−1: none). ``segments`` (E, 3) = (row, start,
    length) as ``data.packing.segment_table`` gives them; an example of length L owns the L − 1 positions that predict
    its tokens 1..L−1, from its start."""
    owner = torch.full(shape, -1, dtype=torch.long)
    for e, (row, start, length) in enumerate(segments.tolist()):
        owner[row, start : start + length - 1] = e
    return owner.reshape(-1)


def position_log_weights(example_weights: Tensor, owner: Tensor) -> Tensor:
    """(N, K) log-weights per position: each position its example's row; positions of no example (padding, never
    labelled) the mean row, so that they still hold a valid mixture."""
    rows = torch.cat([example_weights, example_weights.mean(0, keepdim=True)])
    return rows[owner].log()  # owner −1 reads the appended mean row


def per_example_mean(values: Tensor, labelled: Tensor, owner: Tensor, n_examples: int) -> Tensor:
    """(E,) mean of ``values`` (N,) over each example's labelled positions; 0 for an example with none."""
    keep = labelled & (owner >= 0)
    index = owner.clamp_min(0)
    sums = torch.zeros(n_examples, dtype=values.dtype, device=values.device).index_add_(0, index, torch.where(keep, values, 0.0))
    counts = torch.zeros(n_examples, dtype=values.dtype, device=values.device).index_add_(0, index, keep.to(values.dtype))
    return sums / counts.clamp_min(1)
