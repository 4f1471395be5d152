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


@dataclass
class TopKTail:
    """A sparse teacher: the k most likely ids (N, k), their log-probs (N, k) and the remaining (tail) mass (N,).

    The loss path sees a full distribution rebuilt per chunk: the k ids keep their probabilities and the tail
    mass is spread evenly over the other V − k ids (the maximum-entropy completion; with k = V it is the dense
    teacher exactly). Returned values are log-probs, which the loss path may treat as logits.
    """

    ids: Tensor
    logprobs: Tensor
    tail_mass: Tensor
    vocab: int

    def chunk_logits(self, sl: slice) -> Tensor:
        ids, logprobs, tail = self.ids[sl], self.logprobs[sl].float(), self.tail_mass[sl].float()
        rest = self.vocab - ids.shape[-1]
        fill = torch.log(tail.clamp_min(0) / rest) if rest > 0 else torch.full_like(tail, float("-inf"))
        out = fill[:, None].expand(-1, self.vocab).clone()
        return out.scatter_(-1, ids.long(), logprobs)

    @classmethod
    def from_logits(cls, logits: Tensor, k: int) -> "TopKTail":
        """Top-k + tail of dense teacher logits (N, V) — how a cache builder would store them."""
        logp = torch.log_softmax(logits.float(), -1)
        top, ids = logp.topk(k, dim=-1)
        tail = (1 - top.exp().sum(-1)).clamp_min(0)
        return cls(ids, top, tail, logits.shape[-1])


Target = DenseLogits | TeacherHidden | TopKTail
