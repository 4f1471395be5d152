"""Teacher signals as data. Every regime (live teacher, logit cache, rollout scorer) yields one of these,
so all of them share the one chunked loss path. A target hands out the teacher's signal for a slice of the
flattened (N = B·T) positions: dense-able targets give a (n, V) tensor (``chunk_logits``), sparse sampled
targets give ids with weights (``chunk_sparse``).

``temperature`` says what the dense tensor is: None = raw logits (the loss path divides by its temperature);
a number = log-probs already at that temperature (a cache built at T): the loss path uses them as they are and
refuses a run whose temperature differs.
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
    temperature: float | None = None

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
    temperature: float | None = None

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
    temperature: float | None = None  # None: log-probs at T = 1, usable as logits at any temperature

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


@dataclass
class SparseChunk:
    ids: Tensor  # (n, S) vocabulary ids
    weights: Tensor  # (n, S) estimator weights; padding slots have weight 0


@dataclass
class Sampled:
    """RS-KD (Anshumann et al. 2025): per position, ids drawn from a proposal r and weights w such that
    Σ_s w_s·f(id_s) is an unbiased estimate of Σ_v p(v)·f(v) — with r = p, w = count/K; otherwise
    w = count/K · p/r. The student's softmax stays over the full vocabulary; only terms of the form
    −Σ p·log q (forward KL, up to the teacher's constant entropy) can be computed from it."""

    ids: Tensor  # (N, S)
    weights: Tensor  # (N, S)
    temperature: float

    def chunk_sparse(self, sl: slice) -> SparseChunk:
        return SparseChunk(self.ids[sl], self.weights[sl])


Target = DenseLogits | TeacherHidden | TopKTail | Sampled


def is_sparse(target) -> bool:
    return isinstance(target, Sampled)


def teacher_chunk(target: Target, sl: slice, vocab: int) -> Tensor | SparseChunk:
    """The teacher's signal for positions ``sl``, trimmed to ``vocab`` and cut off from autograd."""
    if is_sparse(target):
        chunk = target.chunk_sparse(sl)
        return SparseChunk(chunk.ids.long(), chunk.weights.float().detach())
    return target.chunk_logits(sl)[:, :vocab].detach()


def logits_divisor(target: Target, temperature: float) -> float:
    """What to divide the target's dense tensor by to get the teacher at ``temperature`` (see module docstring)."""
    if target.temperature is None:
        return temperature
    if abs(target.temperature - temperature) > 1e-6:
        raise ValueError(f"the teacher signal was made at temperature {target.temperature:g} but the objective uses "
                         f"{temperature:g}: set loss.temperature={target.temperature:g} or rebuild the cache")
    return 1.0
