"""Teacher signals as data. Every regime (live teacher, logit cache, rollout scorer) yields one of these,
so all of them share the one chunked loss path. A target hands out the teacher's signal for a slice of the
flattened (N = B·T) positions: dense targets give a (n, V) tensor (``chunk_logits``), top-k targets their k + 1
bins (``chunk_bins``: the loss path collapses the student onto the same bins), sparse sampled targets ids with
weights (``chunk_sparse``), token targets the teacher's log-prob of each label token (``chunk_token``).

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
    extra: tuple = ()  # what a hidden-state KD seam returns beyond (hidden, weight, bias): potstill/hidden/seam.py

    @torch.no_grad()
    def chunk_logits(self, sl: slice) -> Tensor:
        # in the head's dtype: the loss path runs with autocast off, and hidden states that came out of an autocast
        # forward may be narrower than the head
        return F.linear(self.hidden[sl].to(self.weight.dtype), self.weight, self.bias)


# The smallest tail mass the loss path uses. The cache stores the tail in fp16, which rounds anything below 2^-25
# to 0, so a stored 0 only says "less than 2^-25": flooring there keeps log(tail) — and with it reverse-KL-type
# objectives — finite without claiming more than was stored.
TAIL_FLOOR = 2.0**-25
# The smallest teacher log-probability the loss path uses (exp(-80) ≈ 2e-35, a normal fp32 number). A teacher
# that gives a token probability 0 (a -inf logit) would make KL(q‖p) infinite for any student; floored, such a
# token costs at most q·80 and adds exp(-80)-sized terms elsewhere, far below fp32 resolution of the loss.
MIN_TEACHER_LOGP = -80.0


def tail_mass(top_logprobs: Tensor) -> Tensor:
    """1 − Σ exp(top log-probs) over the last axis, ≥ 0: the mass outside the stored ids (computed as
    −expm1(logsumexp), which keeps its digits when the top ids hold almost everything)."""
    return (-torch.expm1(torch.logsumexp(top_logprobs.float(), -1))).clamp_min(0)


def top_k_with_tail(logp: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (n, k), their log-probs (n, k), tail mass (n,)) of log-probs (n, V), most likely first: the one
    top-k computation of the cache builder, ``TopKTail.from_logits`` and (tail only) the vLLM capture."""
    top, ids = logp.topk(k, dim=-1)
    return ids, top, tail_mass(top)


@dataclass
class TopKChunk:
    """A top-k target for one chunk as the loss path uses it: the teacher collapsed to k + 1 bins — the k stored
    ids and one bin holding everything else — and the ids, so the student's distribution can be collapsed the
    same way (``student``). Every divergence then runs on (n, k + 1) log-probs: still a distribution over the
    last axis, so the per-token contract holds and the result is exact for the collapsed distributions."""

    ids: Tensor  # (n, k) int64, clamped into the run's vocabulary
    valid: Tensor  # (n, k) bool: the id lies inside the run's vocabulary (else the slot is empty on both sides)
    teacher_logp: Tensor  # (n, k + 1) normalised teacher log-probs; -inf marks an empty slot or an empty tail

    def student(self, logq: Tensor) -> Tensor:
        """Student log-probs (n, V) → (n, k + 1): the k ids' log-probs and log Σ_{v ∉ ids} q(v), the latter as a
        logsumexp over the masked vocabulary (stable and exact when the top ids hold almost all the mass)."""
        neg_inf = torch.tensor(float("-inf"), device=logq.device)
        top = torch.where(self.valid, logq.gather(-1, self.ids), neg_inf)
        in_top = torch.zeros_like(logq, dtype=torch.bool).scatter_(-1, self.ids, self.valid)
        covered = in_top.all(-1, keepdim=True)  # (n, 1): no vocabulary left for the tail (k = V)
        # double-where: a fully covered row would take logsumexp over nothing (NaN gradient), so it reads all of
        # logq instead and its result is replaced by -inf
        rest = torch.logsumexp(torch.where(in_top & ~covered, neg_inf, logq), -1, keepdim=True)
        return torch.cat([top, torch.where(covered, neg_inf, rest)], -1)

    def with_label(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Ids (n, k + 1) and weights for a term's sparse form −Σ w·log q(id): the k ids with the teacher's
        probabilities, plus the data label y with weight 1 when y is outside them (else 0; unlabelled rows: 0).

        If the data follow the teacher, y falls outside the top k with probability = the tail mass and is then a
        draw from the teacher's tail, so −Σ_top p·log q − [y ∉ top]·log q(y) is an unbiased estimate of the
        cross-entropy H(p, q) = Σ_v p(v)·(−log q(v)) — the tail's shape comes from the data, its mass in
        expectation from the teacher. (Exact at T = 1; at T ≠ 1 the labels still follow the untempered data.)"""
        y = labels.clamp_min(0)[:, None]  # (n, 1)
        in_top = ((self.ids == y) & self.valid).any(-1, keepdim=True)
        label_weight = (~in_top & (labels >= 0)[:, None]).to(self.teacher_logp.dtype)
        top_weight = self.teacher_logp[:, :-1].exp()  # 0 on empty slots
        return torch.cat([self.ids, y], -1), torch.cat([top_weight, label_weight], -1)


@dataclass
class TopKTail:
    """A sparse teacher: the k most likely ids (N, k), their log-probs (N, k) at ``temperature`` and the
    remaining (tail) mass (N,).

    The loss path evaluates every divergence on k + 1 bins (``chunk_bins``): the k ids and one tail bin, for the
    teacher and the student alike (the student's tail bin is its mass outside the k ids). With k = V this is the
    dense teacher exactly. Token statistics and label NLL (selection, temperature schedules) read the
    maximum-entropy completion instead (``chunk_logits``: the tail spread evenly over the other ids).
    """

    ids: Tensor
    logprobs: Tensor
    tail_mass: Tensor
    vocab: int
    temperature: float = 1.0  # stored log-probs are the teacher at this T: the run must use the same T

    def chunk_bins(self, sl: slice, vocab: int) -> TopKChunk:
        """The k + 1-bin teacher for positions ``sl``, for a student with ``vocab`` ids (ids ≥ vocab: empty slots).
        Ids in a row must be distinct (as ``topk`` gives them); the tail bin is floored at TAIL_FLOOR and the
        bins renormalised (fp16 storage leaves Σ ≠ 1 by a few 1e-4)."""
        ids, logprobs = self.ids[sl].long(), self.logprobs[sl].float()
        valid = ids < vocab
        neg_inf = torch.tensor(float("-inf"), device=logprobs.device)
        top = torch.where(valid, logprobs.clamp_min(MIN_TEACHER_LOGP), neg_inf)
        covered = valid.sum(-1, keepdim=True) >= vocab  # distinct ids cover the whole vocabulary: no tail
        tail = self.tail_mass[sl].float()[:, None].clamp_min(TAIL_FLOOR).log()
        bins = torch.cat([top, torch.where(covered, neg_inf, tail)], -1)
        return TopKChunk(torch.where(valid, ids, 0), valid, torch.log_softmax(bins, -1))

    def chunk_logits(self, sl: slice) -> Tensor:
        """The maximum-entropy completion (n, V): the k ids keep their log-probs, the (floored) tail mass is spread
        evenly over the other V − k ids. Used only for token statistics and label NLL."""
        ids, logprobs, tail = self.ids[sl].long(), self.logprobs[sl].float(), self.tail_mass[sl].float()
        rest = self.vocab - ids.shape[-1]
        fill = (tail.clamp_min(TAIL_FLOOR) / rest).log() if rest > 0 else torch.full_like(tail, float("-inf"))
        out = fill[:, None].expand(-1, self.vocab).clone()
        return out.scatter_(-1, ids, logprobs)

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> "TopKTail":
        """Top-k + tail of dense teacher logits (N, V) at ``temperature`` — what the cache builder stores (in fp32)."""
        ids, top, tail = top_k_with_tail(torch.log_softmax(logits.float() / temperature, -1), k)
        return cls(ids, top, tail, logits.shape[-1], temperature)


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


@dataclass
class TokenChunk:
    teacher_logp: Tensor  # (n,) the teacher's log-prob of each position's label token


@dataclass
class TokenLogprobs:
    """Only the teacher's log-prob of each position's label token, (N,) — what a server that scores given tokens
    returns (``potstill/server_teacher.py``). It serves sampled-token terms (``opd``) and label terms; unlabelled
    positions must hold a finite filler (0), since a zero token weight does not cancel a NaN gradient."""

    logp: Tensor  # (N,) log-probs at ``temperature``
    temperature: float = 1.0  # a server scores at T = 1: the run must use the same T

    def chunk_token(self, sl: slice) -> TokenChunk:
        return TokenChunk(self.logp[sl].float().clamp_min(MIN_TEACHER_LOGP))


Target = DenseLogits | TeacherHidden | TopKTail | Sampled | TokenLogprobs


def is_sparse(target) -> bool:
    return isinstance(target, Sampled)


def teacher_chunk(target: Target, sl: slice, vocab: int) -> Tensor | SparseChunk | TopKChunk | TokenChunk:
    """The teacher's signal for positions ``sl`` as the objective uses it, cut off from autograd: dense (n, vocab)
    logits or log-probs, sampled ids + weights, top-k collapsed to k + 1 bins, or label-token log-probs."""
    if isinstance(target, TokenLogprobs):
        return TokenChunk(target.chunk_token(sl).teacher_logp.detach())
    if is_sparse(target):
        chunk = target.chunk_sparse(sl)
        return SparseChunk(chunk.ids.long(), chunk.weights.float().detach())
    if isinstance(target, TopKTail):
        chunk = target.chunk_bins(sl, vocab)
        return TopKChunk(chunk.ids, chunk.valid, chunk.teacher_logp.detach())
    if hasattr(target, "chunk_aligned"):  # a teacher with its own tokenizer (losses/aligned.py): its own vocabulary
        return target.chunk_aligned(sl)
    return dense_teacher_chunk(target, sl, vocab)


def teacher_logprobs(teacher: Tensor, divisor: float) -> Tensor:
    """Dense teacher logits (n, V) → log-probs at the objective's temperature, floored at MIN_TEACHER_LOGP so that
    a teacher's -inf entries cannot make reverse-KL-type terms (or their gradients) infinite."""
    teacher = teacher.float()
    return F.log_softmax(teacher if divisor == 1.0 else teacher / divisor, -1).clamp_min(MIN_TEACHER_LOGP)


def dense_teacher_chunk(target: Target, sl: slice, vocab: int) -> Tensor:
    """A dense (n, vocab) teacher tensor for positions ``sl`` (token statistics and label NLL): top-k targets give
    their maximum-entropy completion."""
    return target.chunk_logits(sl)[:, :vocab].detach()


def logits_divisor(target: Target, temperature: float) -> float:
    """What to divide the target's dense tensor by to get the teacher at ``temperature`` (see module docstring)."""
    if target.temperature is None:
        return temperature
    if abs(target.temperature - temperature) > 1e-6:
        raise ValueError(f"the teacher signal was made at temperature {target.temperature:g} but the objective uses "
                         f"{temperature:g}: set loss.temperature={target.temperature:g} or rebuild the cache")
    return 1.0
