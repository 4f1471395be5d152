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

from potstill.losses.hparams import HParam, describe, resolve
from potstill.losses.schedules import TaidSchedule
from potstill.registry import Registry


@dataclass(frozen=True)
class DivergenceSpec:
    name: str
    fn: Callable[..., Tensor]
    hparams: dict[str, HParam] = field(default_factory=dict)
    is_divergence: bool = True  # zero on identical inputs and never negative (False for cross-entropy)
    uses_labels: bool = False  # evaluated against the one-hot data labels instead of the teacher
    doc: str = ""
    schedule: type | None = None  # built from hparams; supplies the fn's dynamic arguments (e.g. TAID's t)
    sparse: Callable[..., Tensor] | None = None  # (student_logp, ids, weights) -> per position, for sampled targets
    # (student_label_logp, teacher_label_logp, sampler_label_logp | None, **hp) -> per position: a term evaluated only
    # at the label token (a sample); the loss path always uses it, ``fn`` is the exact value it estimates
    token: Callable[..., Tensor] | None = None
    # a cross-tokenizer term (losses/aligned.py): 'aligned' (uld), 'hybrid' (gold) or 'chunk' (alm: its fn takes chunk
    # log-likelihoods, not distributions); None for ordinary per-token divergences over one shared vocabulary
    crosstok: str | None = None


DIVERGENCES: Registry[DivergenceSpec] = Registry("divergence")


def register(name: str, *, is_divergence: bool = True, uses_labels: bool = False, schedule: type | None = None,
             sparse: Callable[..., Tensor] | None = None, token: Callable[..., Tensor] | None = None,
             crosstok: str | None = None, **hparams: HParam):
    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = [p for p in inspect.signature(fn).parameters][2:]
        expected = list(schedule.provides) if schedule else list(hparams)
        if sorted(params) != sorted(expected):
            raise TypeError(f"divergence {name!r}: signature {params} does not match declared {expected}")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        DIVERGENCES.register(name)(DivergenceSpec(name, fn, hparams, is_divergence, uses_labels, doc, schedule, sparse,
                                                   token, crosstok))
        return fn

    return add


def resolve_hparams(name: str, given: dict[str, float]) -> dict[str, float]:
    """Defaults filled in; unknown names and out-of-range values raise with a message naming the field."""
    return resolve(f"divergence {name!r}", DIVERGENCES.get(name).hparams, given)


def divergence(name: str, **hparams: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The registered per-token function ``fn(student_logp, teacher_logp) -> (...)`` with validated hparams.

    For scheduled objectives the dynamic arguments may be given directly (``divergence("taid", t=0.7)``);
    otherwise they take the schedule's starting value."""
    spec = DIVERGENCES.get(name)
    dynamic = {k: hparams.pop(k) for k in list(hparams) if spec.schedule and k in spec.schedule.provides}
    static = resolve_hparams(name, hparams)
    if spec.schedule is None:
        return partial(spec.fn, **static)
    return partial(spec.fn, **{**spec.schedule(**static).current(), **dynamic})


def list_divergences() -> list[dict]:
    """Name, description, and hyperparameters (default and range) of every registered objective."""
    out = []
    for name in DIVERGENCES.names():
        spec = DIVERGENCES.get(name)
        hp = describe(spec.hparams)
        if spec.token is not None:
            targets = "dense, token log-probs (the label token only)"
        elif spec.crosstok is not None:
            targets = "dense, cross-tokenizer (aligned by bytes)"
        else:
            targets = "labels" if spec.uses_labels else "dense, top-k" + (", sampled" if spec.sparse else "")
        out.append({"name": name, "doc": spec.doc, "hparams": hp, "target": targets})
    return out


# ---- shared -inf-safe pieces ---------------------------------------------------------------------------------


def _zero(like: Tensor) -> Tensor:
    """A 0-dim zero for ``torch.where``: measured ~1.4x faster over an (n, V) chunk than a Python 0.0 on CPU."""
    return torch.zeros((), dtype=like.dtype, device=like.device)


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) = Σ p·(log p − log q) over the last axis; entries with p = 0 contribute 0 (even where q = 0).

    Where p = 0 the difference is replaced by 0 *before* the product: there log p − log q may be -inf − (-inf)
    = NaN, and ``torch.where`` only passes a zero gradient back into the unselected branch (a subtraction, whose
    local derivatives are ±1, so no 0·inf arises), so both the value and the gradient stay finite; the product
    p·0 is 0 with zero gradient. A NaN input is *not* an entry that does not count: ``p != 0`` keeps it, so a
    broken signal shows as NaN (the loop's non-finite guard stops on it) instead of being silently dropped from
    the sum. (Few passes over the (n, V) chunk on purpose: this runs on every vocabulary entry of every token.)"""
    return _weighted_log_ratio(logp.exp(), logp - logq)


def _weighted_log_ratio(p: Tensor, log_ratio: Tensor) -> Tensor:
    """Σ p·log_ratio over the last axis with entries where p = 0 counted as 0: ``kl``'s sum, given the ratio (a
    caller that needs KL both ways computes log p − log q once; −Σ q·(log p − log q) is KL(q‖p) exactly)."""
    return (p * torch.where(p != 0, log_ratio, _zero(p))).sum(-1)


def cross_entropy(logp: Tensor, logq: Tensor) -> Tensor:
    """H(p, q) = −Σ p·log q over the last axis, with 0·log 0 = 0 (log q replaced by 0 where p = 0, NaN as in
    ``kl``)."""
    p = logp.exp()
    return -(p * torch.where(p != 0, logq, _zero(logp))).sum(-1)


def entropy(logp: Tensor) -> Tensor:
    """H(p) = −Σ p·log p over the last axis, with 0·log 0 = 0."""
    return cross_entropy(logp, logp)


def label_logprob(logp: Tensor, labels: Tensor) -> Tensor:
    """log p(y) (n,) of log-probs (n, V) at the data labels (n,); unlabelled rows (-100) read id 0, the caller
    masks them. The one place label NLL (training, selection statistics, evaluation) is read."""
    return logp.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)


def log_mix(logp: Tensor, logq: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1−w)·q), computed in log space so that tiny probabilities do not underflow.

    Where both are -inf (a vocabulary entry masked on both sides) the result is -inf with a zero gradient:
    ``logaddexp``'s backward would be exp(-inf − (-inf)) = NaN there, so those inputs are replaced first."""
    if weight_p <= 0.0:
        return logq
    if weight_p >= 1.0:
        return logp
    neither = torch.isneginf(torch.maximum(logp, logq))  # both -inf (a NaN stays NaN, as in ``kl``)
    zero = _zero(logp)
    mixed = torch.logaddexp(torch.where(neither, zero, logp) + math.log(weight_p),
                            torch.where(neither, zero, logq) + math.log1p(-weight_p))
    return torch.where(neither, torch.full((), float("-inf"), dtype=mixed.dtype, device=mixed.device), mixed)


# ---- the registered objectives (formulas: docs/objectives.md) ----------------------------------------------


def sampled_cross_entropy(student_logp: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """−Σ_s w_s·log q(id_s): an unbiased estimate of H(p, q) = KL(p‖q) + H(p) from a sampled target (same
    gradient as forward KL; the value is offset by the teacher's entropy, which samples cannot give)."""
    return -(weights * student_logp.gather(-1, ids)).sum(-1)


def importance_weight(student_label_logp: Tensor, sampler_label_logp: Tensor | None, rho_max: float) -> Tensor:
    """ρ = q(y)/r(y) (detached) of a label token y drawn from the sampler r; 1 without sampler log-probs (the sampler
    was the current student at the loss' temperature); capped at ``rho_max`` when it is > 0."""
    if sampler_label_logp is None:
        return torch.ones_like(student_label_logp)
    rho = (student_label_logp.detach() - sampler_label_logp).exp()
    return rho.clamp_max(rho_max) if rho_max > 0 else rho


def sampled_token_reverse_kl(student_label_logp: Tensor, teacher_label_logp: Tensor,
                             sampler_label_logp: Tensor | None, rho_max: float) -> Tensor:
    """On-policy distillation on the sampled token y (Thinking Machines' recipe): value log q(y) − log p(y), an
    unbiased estimate of KL(q‖p) when y ~ q; gradient the importance-weighted REINFORCE form ρ·(log q(y) − log p(y))
    ·∇log q(y) = −A·ρ·∇log q(y) with the advantage A = log p(y) − log q(y) (A and ρ detached), whose expectation
    over y ~ r is ∇KL(q‖p) (E_q[∇log q] = 0 removes the value's own gradient)."""
    log_ratio = (student_label_logp - teacher_label_logp).detach()  # −A
    surrogate = importance_weight(student_label_logp, sampler_label_logp, rho_max) * log_ratio * student_label_logp
    return log_ratio + (surrogate - surrogate.detach())  # the value of log_ratio, the gradient of the surrogate


@register("fkl", sparse=sampled_cross_entropy)
def forward_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Forward KL(p‖q): mass-covering; the classic Hinton KD objective."""
    return kl(teacher_logp, student_logp)


@register("rkl")
def reverse_kl(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Reverse KL(q‖p): mode-seeking (MiniLLM)."""
    return kl(student_logp, teacher_logp)


@register("opd", token=sampled_token_reverse_kl,
          rho_max=HParam(0.0, 0.0, 1e6, "cap on the importance weight q/q_sampler; 0 = uncapped (as the recipe)"))
def on_policy_distillation(student_logp: Tensor, teacher_logp: Tensor, rho_max: float) -> Tensor:
    """Sampled-token reverse KL (on-policy distillation): log q(y) − log p(y) on the label token, REINFORCE gradient."""
    # The exact value the loss path's sampled-token form (``sampled_token_reverse_kl``) estimates: KL(q‖p). The
    # importance-weight cap only shapes the estimator's gradient, so it has no part here.
    del rho_max
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


@register("ce", is_divergence=False, uses_labels=True, sparse=sampled_cross_entropy)
def soft_cross_entropy(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Cross-entropy H(p, q) against the data labels (p is one-hot): plain next-token training."""
    # Its sparse form is the same cross-entropy with the one-hot label as a one-sample target (weight 1): the
    # loss path uses it, so no (n, V) one-hot tensor is built; this dense form is the definition the tests check.
    return cross_entropy(teacher_logp, student_logp)


@register("skl", alpha=HParam(0.1, 0.0, 1.0, "weight of the teacher in the skewed mixture (DistiLLM: 0.1)"))
def skew_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Skew KL (DistiLLM): KL(p ‖ α·p + (1−α)·q); α = 0 is forward KL."""
    return kl(teacher_logp, log_mix(teacher_logp, student_logp, alpha))


@register("srkl", alpha=HParam(0.1, 0.0, 1.0, "weight of the student in the skewed mixture (DistiLLM: 0.1)"))
def skew_reverse_kl(student_logp: Tensor, teacher_logp: Tensor, alpha: float) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ (1−α)·p + α·q); α = 0 is reverse KL."""
    return kl(student_logp, log_mix(teacher_logp, student_logp, 1.0 - alpha))


@register("tvd")
def total_variation(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Total variation ½·Σ|p − q|; 1 − TVD is the speculative-sampling acceptance rate (DistillSpec)."""
    return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)


# The AKL head without sorting the vocabulary (a full sort per row costs several times the rest of the loss).
# Peaked rows are decided from the top _AKL_TOPK probabilities; flatter rows from a per-row histogram of p over
# _AKL_BUCKETS buckets keyed by p's fp32 exponent and top 7 mantissa bits (monotone in p ≥ 0, ~0.8 % wide), plus
# an exact sort of the one bucket where the cumulative mass crosses mu.
_AKL_TOPK = 32
_AKL_BUCKETS = 4096


def _head_size(p_desc: Tensor, mu: float, mass_before: Tensor | float = 0.0) -> Tensor:
    """How many of the descending values p_desc (n, k) keep the cumulative mass (mass_before included) ≤ mu. The
    sum is taken in fp64 and compared after rounding to fp32, as the fp32 ``cumsum`` of the definition does; it is
    nondecreasing (p ≥ 0), so the passing ranks form a prefix and counting them gives its length."""
    cum = (p_desc.double().cumsum(-1) + mass_before).float()
    return (cum <= mu).sum(-1)


def _boundary_by_topk(p: Tensor, mu: float) -> tuple[Tensor, Tensor, Tensor]:
    """Head size (n,), boundary value (n, 1) (the size-th largest p) and the value after it (n, 1) of each row from
    its top _AKL_TOPK + 1 values; a row whose size comes out as k − 1 may have a longer head (the caller checks)."""
    k = min(_AKL_TOPK + 1, p.shape[-1])  # + 1: the value after the head's last one
    top = p.topk(k, -1).values  # (n, k) descending
    size = _head_size(top, mu).clamp_(1, k - 1 if k < p.shape[-1] else k)
    return size, top.gather(-1, (size - 1)[:, None]), top.gather(-1, size.clamp_max(k - 1)[:, None])


def _boundary_by_histogram(p: Tensor, p_max: Tensor, mu: float) -> tuple[Tensor, Tensor, Tensor]:
    """As ``_boundary_by_topk`` for any row, exactly, in a few passes over p (n, V); p_max (n, 1): each row's max."""
    key = p.view(torch.int32) >> 16  # sign 0, exponent, 7 mantissa bits: nondecreasing in p ≥ 0
    top_key = p_max.view(torch.int32) >> 16
    bucket = (top_key - key).clamp_max_(_AKL_BUCKETS - 1).long()  # (n, V); 0 = the top token's bucket
    mass = p.new_zeros(p.shape[0], _AKL_BUCKETS, dtype=torch.float64).scatter_add_(1, bucket, p.double())
    counts = torch.zeros_like(mass, dtype=torch.int64).scatter_add_(1, bucket, bucket.new_ones(()).expand_as(bucket))
    cum_mass = mass.cumsum(-1)
    crossing = (cum_mass.float() <= mu).sum(-1, keepdim=True).clamp_max_(_AKL_BUCKETS - 1)  # (n, 1)
    mass_before = cum_mass.gather(-1, crossing) - mass.gather(-1, crossing)  # the buckets above the crossing
    count_in = counts.gather(-1, crossing)
    count_above = (counts.cumsum(-1).gather(-1, crossing) - count_in).squeeze(-1)
    width = min(int(count_in.max()) + 1, p.shape[-1])  # + 1: the value after the head's last one
    values = torch.where(bucket == crossing, p, _zero(p)).topk(width, -1).values  # descending, 0-padded
    size_in = torch.minimum(_head_size(values, mu, mass_before), count_in.squeeze(-1))  # padding never counts
    size_in = torch.where(count_above == 0, size_in.clamp_min(1), size_in)  # the top token is always in the head
    boundary = values.gather(-1, (size_in - 1).clamp_min(0)[:, None])
    following = values.gather(-1, size_in[:, None])
    ends_above = (size_in == 0).nonzero().squeeze(-1)  # the head is exactly the buckets above the crossing
    if ends_above.numel():
        above = bucket[ends_above] < crossing[ends_above]
        boundary[ends_above] = torch.where(above, p[ends_above], float("inf")).amin(-1, keepdim=True)
        following[ends_above] = values[ends_above, :1]  # in a lower bucket, so smaller
    return count_above + size_in, boundary, following


def _rows(x: Tensor, rows: Tensor) -> Tensor:
    """x[rows], without the copy when rows are all of them."""
    return x if rows.numel() == x.shape[0] else x[rows]


def akl_head(p: Tensor, mu: float) -> Tensor:
    """Bool mask (n, V) of the AKL head: the top token plus the longest teacher-sorted prefix whose cumulative mass
    stays ≤ mu, as in ``adaptive_kl``. Among ids tied at the boundary probability the lowest join the head first
    (the order of a stable sort, and of the definition in tests/test_losses.py::_akl_ref).

    The head is p > b plus the first L − #(p > b) ids with p == b, where L is its size and b the L-th largest
    probability (the boundary). Both routes to L and b are exact, so which rows take which only matters for speed:
    rows whose top _AKL_TOPK tokens cannot reach mu (k·max p ≤ mu) go straight to the histogram."""
    with torch.no_grad():
        n, vocab = p.shape
        p_max = p.amax(-1, keepdim=True)
        size = torch.empty(n, dtype=torch.int64, device=p.device)
        boundary, following = p_max.clone(), p_max.clone()
        by_topk = (~(_AKL_TOPK * p_max.squeeze(-1) <= mu)).nonzero().squeeze(-1)  # NaN rows too
        by_histogram = torch.ones(n, dtype=torch.bool, device=p.device)
        if by_topk.numel():
            size[by_topk], boundary[by_topk], following[by_topk] = _boundary_by_topk(_rows(p, by_topk), mu)
            by_histogram[by_topk] = size[by_topk] == _AKL_TOPK  # the head may reach past the top k
        by_histogram &= vocab > _AKL_TOPK + 1  # else the top k holds the whole row
        hist = by_histogram.nonzero().squeeze(-1)
        if hist.numel():
            size[hist], boundary[hist], following[hist] = _boundary_by_histogram(_rows(p, hist), p_max[hist], mu)
        head = p >= boundary
        tied = ((following == boundary) & (size < vocab)[:, None]).nonzero()[:, 0]  # more ids at b than fit
        if tied.numel():
            p_t, b_t = p[tied], boundary[tied]
            at_boundary = p_t == b_t
            room = size[tied] - (p_t > b_t).sum(-1)  # head places left for boundary ids
            head[tied] = (p_t > b_t) | (at_boundary & (at_boundary.cumsum(-1) <= room[:, None]))
    return head


@register("akl", mu=HParam(0.5, 0.0, 1.0, "teacher mass that defines the head (AKL: 0.5)"))
def adaptive_kl(student_logp: Tensor, teacher_logp: Tensor, mu: float) -> Tensor:
    """Adaptive KL (Wu et al. 2024): FKL and RKL weighted by the teacher–student gap on the head vs the tail."""
    p, q = teacher_logp.exp(), student_logp.exp()
    gap = (p - q.detach()).abs()  # the weights carry no gradient through the student (as in the authors' code)
    g_head = torch.where(akl_head(p, mu), gap, _zero(gap)).sum(-1)
    total = gap.sum(-1)  # head + tail
    w_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), 0.5)  # identical rows: both terms are 0
    log_ratio = teacher_logp - student_logp  # shared by KL(p‖q) and KL(q‖p) = −Σ q·log_ratio
    return w_head * _weighted_log_ratio(p, log_ratio) - (1 - w_head) * _weighted_log_ratio(q, log_ratio)


@register("taid", schedule=TaidSchedule,
          t_start=HParam(0.4, 0.0, 1.0, "initial interpolation weight of the teacher"),
          t_end=HParam(1.0, 0.0, 1.0, "final interpolation weight of the teacher"),
          alpha=HParam(5e-4, 0.0, 1.0, "step size of the adaptive increase of t"),
          beta=HParam(0.99, 0.0, 1.0, "momentum of the loss' relative change"))
def taid(student_logp: Tensor, teacher_logp: Tensor, t: float) -> Tensor:
    """TAID (Shing et al. 2025): KL(p_t ‖ q) with p_t = softmax((1−t)·stopgrad(log q) + t·log p); t follows a schedule."""
    # The authors' code uses the cross-entropy −Σ p_t log q, which differs from this KL by H(p_t): the same
    # gradient (p_t carries none), a value that is 0 on identical inputs like every other divergence here.
    # Interpolating log-probs equals interpolating logits: the per-row log-normalisers cancel in the softmax.
    # The end points are taken exactly so that 0·(-inf) never appears for masked vocabulary entries.
    if t >= 1.0:
        return kl(teacher_logp, student_logp)
    mixed = student_logp.detach() if t <= 0.0 else (1.0 - t) * student_logp.detach() + t * teacher_logp
    target = torch.log_softmax(mixed, dim=-1)
    return kl(target, student_logp)
