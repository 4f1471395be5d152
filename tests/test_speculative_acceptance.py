"""Acceptance math of speculative decoding: exact values from the definitions and the limits."""
from __future__ import annotations

import math

import pytest
import torch

from potstill.speculative.acceptance import best_gamma, expected_acceptance, predicted_speedup, tokens_per_call


def test_expected_acceptance_is_the_overlap_of_the_two_distributions():
    torch.manual_seed(0)
    draft = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), -1)
    target = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), -1)
    overlap = torch.minimum(draft.exp(), target.exp()).sum(-1)  # Σ_v min(p, q), the definition
    assert expected_acceptance(draft, target).tolist() == pytest.approx(overlap.tolist(), rel=1e-5)
    assert expected_acceptance(target, draft).tolist() == pytest.approx(overlap.tolist(), rel=1e-5)  # symmetric


def test_expected_acceptance_exact_values_and_masked_entries():
    log = lambda probs: torch.tensor(probs).log()  # noqa: E731  (log 0 = -inf: a masked entry)
    draft = torch.stack([log([0.5, 0.5, 0.0]), log([1.0, 0.0, 0.0]), log([0.2, 0.3, 0.5]), log([0.0, 0.0, 1.0])])
    target = torch.stack([log([0.5, 0.5, 0.0]), log([0.0, 1.0, 0.0]), log([0.6, 0.3, 0.1]), log([0.0, 0.0, 1.0])])
    got = expected_acceptance(draft, target)
    assert not got.isnan().any()
    # identical → 1; disjoint point masses → 0; 0.2 + 0.3 + 0.1; identical point masses (greedy agreement) → 1
    assert got.tolist() == pytest.approx([1.0, 0.0, 0.6, 1.0], rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.999])
@pytest.mark.parametrize("gamma", [0, 1, 4, 8])
def test_tokens_per_call_is_the_closed_form(alpha, gamma):
    assert tokens_per_call(alpha, gamma) == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha), rel=1e-9)


def test_tokens_per_call_limits():
    assert tokens_per_call(1.0, 4) == 5.0  # every proposal accepted, plus the bonus token
    assert tokens_per_call(1 - 1e-12, 4) == pytest.approx(5.0, rel=1e-9)  # continuous at α = 1
    assert tokens_per_call(0.0, 7) == 1.0  # every proposal rejected: only the target's correction
    assert tokens_per_call(0.6, 0) == 1.0  # γ = 0 is target-only decoding
    assert tokens_per_call(0.5, 2) == 1.75  # 1 + 0.5 + 0.25


def test_predicted_speedup_values():
    assert predicted_speedup(0.5, 2, 0.25) == 1.75 / 1.5
    assert predicted_speedup(1.0, 8, 0.0) == 9.0  # a free draft that is always right
    assert predicted_speedup(0.0, 3, 0.1) == pytest.approx(1 / 1.3, rel=1e-12)  # a useless draft only costs


def test_best_gamma_is_the_argmax_of_the_predicted_speedup():
    for alpha in [0.1, 0.5, 0.7, 0.9, 0.99]:
        for c in [0.0, 0.02, 0.1, 0.5, 2.0]:
            speedups = {g: (1 - alpha ** (g + 1)) / (1 - alpha) / (g * c + 1) for g in range(1, 9)}
            assert best_gamma(alpha, c, 8) == max(speedups, key=speedups.get)


def test_best_gamma_limits():
    assert best_gamma(1.0, 0.01, 8) == 8  # always accepted and nearly free: propose as many as allowed
    assert best_gamma(0.9, 0.0, 5) == 5  # a free draft: more is always better
    assert best_gamma(0.0, 0.5, 8) == 1  # never accepted: the least costly round
    assert best_gamma(0.8, 0.05, 1) == 1
    # α = 0.8, c = 0.05: τ/(γc+1) = 3.0823 at γ = 7, 3.0921 at 8, 3.0780 at 9: an interior maximum
    assert best_gamma(0.8, 0.05, 20) == 8
    assert best_gamma(0.8, 0.05, 7) == 7


def test_bad_arguments_raise_one_clear_line():
    with pytest.raises(ValueError, match="alpha must be in"):
        tokens_per_call(1.5, 2)
    with pytest.raises(ValueError, match="gamma .* must be ≥ 0"):
        tokens_per_call(0.5, -1)
    with pytest.raises(ValueError, match="cost_ratio"):
        predicted_speedup(0.5, 2, -0.1)
    with pytest.raises(ValueError, match="gamma_max"):
        best_gamma(0.5, 0.1, 0)
    assert not math.isnan(predicted_speedup(1.0, 0, 0.0))
