"""Hidden-state and relational distillation losses: pure functions on tensors, no model code.

Like every leaf of the loss path they return *sums* over valid positions; the loop divides by the step's global
valid-token count (``reduce.normalise``), so they compose with the logit objective in one weighted sum.

* ``mse`` / ``cosine``: per position, between (already projected) student states (N, d) and teacher states (N, d).
  The per-position MSE is the mean over the feature dimension, so its scale does not grow with the width.
* ``relation``: MiniLM / MiniLMv2 self-attention relations and relational embedding KD. For each of the two sets
  of vectors x (..., T, d) (the widths of student and teacher may differ: only the T × T relation matrices are
  compared) a row-wise relation R[i, :] over the valid keys is built — ``softmax``: softmax(x_i · x_j / √d) (MiniLM),
  ``cosine``: cos(x_i, x_j) — and each valid row i contributes ``kl``: KL(R_teacher[i] ‖ R_student[i]) or ``mse``:
  the mean over valid keys of (R_teacher − R_student)² (for ``softmax`` between the probabilities). The sum runs over every leading index (batch, relation
  head) and valid row; a caller that wants MiniLM's mean over relation heads divides by the head count.

Memory: ``relation`` never builds the full (…, T, T) matrices. It walks blocks of (leading index, query rows) of at
most ``chunk_elements`` relation entries, each under activation checkpointing, so forward and backward hold one
block's T × T slice at a time (plus the inputs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

RELATION_SIMILARITIES = ("softmax", "cosine")
RELATION_LOSSES = ("kl", "mse")
DEFAULT_CHUNK_ELEMENTS = 2**22  # relation entries per block: 16 MB of fp32 per block tensor


def _masked_sum(values: Tensor, mask: Tensor | None) -> Tensor:
    return values.sum() if mask is None else values[mask].sum()


def mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ over valid positions of mean_d (student − teacher)²; ``student``/``teacher`` (..., d), ``mask`` (...) bool."""
    per_position = (student.float() - teacher.float()).pow(2).mean(-1)
    return _masked_sum(per_position, mask)


def cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ over valid positions of 1 − cos(student, teacher); shapes as in ``mse``."""
    per_position = 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    return _masked_sum(per_position, mask)


def _relation_rows(queries: Tensor, keys: Tensor, key_valid: Tensor, similarity: str) -> Tensor:
    """Relation rows (L, r, T) of ``queries`` (L, r, d) against ``keys`` (L, T, d), 0 at invalid keys:
    ``softmax`` gives the row's log-probabilities, ``cosine`` the cosines."""
    if similarity == "softmax":
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])
        return scores.masked_fill(~key_valid, float("-inf")).log_softmax(-1).masked_fill(~key_valid, 0.0)
    cos = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)
    return cos.masked_fill(~key_valid, 0.0)


def _block_sum(s_q, s_k, t_q, t_k, key_valid, row_valid, similarity: str, loss: str) -> Tensor:
    """Σ over valid rows of one block (L, r) of the per-row relation loss."""
    # a row without any valid key (only ever an invalid row) would be all -inf: let it see every key so all values
    # stay finite (no NaN can leak into gradients); it is dropped by row_valid below
    key_valid = key_valid | ~key_valid.any(-1, keepdim=True)
    student = _relation_rows(s_q, s_k, key_valid, similarity)
    with torch.no_grad():
        teacher = _relation_rows(t_q, t_k, key_valid, similarity)
    if loss == "kl":
        per_row = (teacher.exp() * (teacher - student)).masked_fill(~key_valid, 0.0).sum(-1)
    else:
        if similarity == "softmax":  # MSE between the attention distributions themselves
            student, teacher = student.exp(), teacher.exp()
        n_keys = key_valid.sum(-1)
        per_row = (student - teacher).pow(2).masked_fill(~key_valid, 0.0).sum(-1) / n_keys
    return per_row.masked_fill(~row_valid, 0.0).sum()


def relation(student: Tensor, teacher: Tensor, mask: Tensor | None = None, *, similarity: str = "softmax",
             loss: str = "kl", causal: bool = False, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Σ over leading indices and valid rows of the relation loss (module docstring).

    ``student`` (..., T, d_s), ``teacher`` (..., T, d_t) with the same leading shape; ``mask`` (..., T) bool
    (broadcast over the leading shape) marks the valid positions: a row counts when its position is valid and keys
    are the valid positions (``causal``: only those at or before the row, as a decoder's attention sees them).
    """
    if similarity not in RELATION_SIMILARITIES:
        raise ValueError(f"relation similarity {similarity!r}: expected one of {', '.join(RELATION_SIMILARITIES)}")
    if loss not in RELATION_LOSSES:
        raise ValueError(f"relation loss {loss!r}: expected one of {', '.join(RELATION_LOSSES)}")
    if loss == "kl" and similarity != "softmax":
        raise ValueError("relation loss 'kl' compares distributions: it needs similarity 'softmax'")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"relation: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ "
                         "before the feature dimension")
    T = student.shape[-2]
    s = student.float().reshape(-1, T, student.shape[-1])  # (L, T, d_s)
    t = teacher.float().reshape(-1, T, teacher.shape[-1])
    L = s.shape[0]
    valid = (torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device) if mask is None
             else mask.to(torch.bool).expand(student.shape[:-1])).reshape(L, T)
    rows_per = max(1, min(T, chunk_elements // max(T, 1)))
    leading_per = max(1, chunk_elements // (rows_per * T)) if rows_per == T else 1
    positions = torch.arange(T, device=student.device)
    total = s.new_zeros(())
    for l0 in range(0, L, leading_per):
        ls = slice(l0, l0 + leading_per)
        for r0 in range(0, T, rows_per):
            rs = slice(r0, r0 + rows_per)
            key_valid = valid[ls, None, :]  # (l, 1, T)
            if causal:
                key_valid = key_valid & (positions[None, :] <= positions[rs, None])[None]  # (l, r, T)
            row_valid = valid[ls, rs]
            args = (s[ls, rs], s[ls], t[ls, rs], t[ls], key_valid, row_valid, similarity, loss)
            block = (checkpoint(_block_sum, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _block_sum(*args))
            total = total + block
    return total
