"""Acceptance math of speculative decoding (Leviathan et al. 2023, Chen et al. 2023): how many tokens one target
call yields, and the speed-up, from the per-position acceptance probability α.

With draft distribution q and target distribution p at a position (both after the same sampling transform), the
rejection rule accepts the draft's token with probability Σ_v min(p(v), q(v)) = 1 − TVD(p, q). If every position
accepts independently with probability α, a round that proposes γ tokens commits 1 + (number accepted before the
first rejection) tokens, in expectation τ = Σ_{k=0}^{γ} α^k = (1 − α^(γ+1)) / (1 − α). A round costs γ draft
forwards and one target forward; with c = (draft forward time) / (target forward time) its cost in target forwards
is γ·c + 1, so the speed-up over target-only decoding (one token per target forward) is τ / (γ·c + 1).
"""
from __future__ import annotations

from torch import Tensor

from potstill.losses.divergences import total_variation


def expected_acceptance(draft_logp: Tensor, target_logp: Tensor) -> Tensor:
    """(n,) probability Σ_v min(p, q) = 1 − TVD(p, q) that the rejection rule accepts the draft's token, from
    log-probs (n, V) after the same sampling transform (``sampling.sampling_logprobs``); -inf entries are fine."""
    return 1.0 - total_variation(draft_logp.float(), target_logp.float())


def _check(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate alpha must be in [0, 1], got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma (draft tokens per round) must be ≥ 0, got {gamma}")


def tokens_per_call(alpha: float, gamma: int) -> float:
    """τ = (1 − α^(γ+1)) / (1 − α): expected tokens committed per target call when γ are proposed (γ + 1 at α = 1).
    Summed as the geometric series Σ_{k=0}^{γ} α^k, which has no 0/0 at α = 1 and no cancellation near it."""
    _check(alpha, gamma)
    return float(sum(alpha ** k for k in range(gamma + 1)))


def predicted_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """τ / (γ·c + 1): expected speed-up over target-only decoding, c = draft forward time / target forward time."""
    if cost_ratio < 0:
        raise ValueError(f"cost_ratio (draft / target forward time) must be ≥ 0, got {cost_ratio}")
    return tokens_per_call(alpha, gamma) / (gamma * cost_ratio + 1.0)


def best_gamma(alpha: float, cost_ratio: float, gamma_max: int) -> int:
    """The γ in 1..gamma_max with the largest predicted speed-up (the smallest such γ on ties)."""
    if gamma_max < 1:
        raise ValueError(f"gamma_max must be ≥ 1, got {gamma_max}")
    speedups = [predicted_speedup(alpha, g, cost_ratio) for g in range(1, gamma_max + 1)]
    return 1 + speedups.index(max(speedups))
