"""Teacher signals as data. Every regime (live teacher, logit cache, rollout scorer) yields one of these,
so all of them share the one chunked loss path. A target hands out raw teacher logits for a slice of the
flattened (N = B·T) positions; the loss path applies temperature and log-softmax, in one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class DenseLogits:
    """Precomputed teacher logits, shape (N, V_teacher). Small vocabularies and tests."""

    logits: Tensor

    def chunk_logits(self, sl: slice) -> Tensor:
        return self.logits[sl]


@dataclass
class TeacherHidden:
    """A live teacher's last hidden states (N, H_teacher) and its output head (V_teacher, H_teacher).

    Logits are projected one chunk at a time, so the teacher's B·T·V tensor never exists either.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @torch.no_grad()
    def chunk_logits(self, sl: slice) -> Tensor:
        return F.linear(self.hidden[sl], self.weight, self.bias)


Target = DenseLogits | TeacherHidden
