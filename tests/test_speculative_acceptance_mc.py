"""Monte-Carlo checks of the acceptance math and of potstill's rejection rule (``decode.rejection_step``) against
the speculative-sampling rule simulated from its definition (Leviathan et al. 2023, Chen et al. 2023): draw x ~ q,
accept with probability min(1, p(x)/q(x)), else draw from norm(max(0, p − q)); after an acceptance the bonus token is
drawn from the next position's p. Every simulation is seeded and vectorised over its N draws (``rejection_step`` is
batched over leading dimensions, so N rounds are one call). The naive rule is the reference each bound is first
checked on; each test also runs the statistic on a plausible wrong formula or rule and asserts that the bound rejects
it, so the test can fail."""
from __future__ import annotations

import math

import pytest
import torch

from potstill.speculative.acceptance import expected_acceptance, tokens_per_call
from potstill.speculative.decode import rejection_step

N_DRAWS = 200_000
SIGMAS = 5.0


def _distribution(vocab: int, shape: str, generator: torch.Generator) -> torch.Tensor:
    """(V,) float64 probabilities: flat (logits ~ N(0, 0.5²)), peaked (N(0, 4²)), or masked: peaked with a random
    third of the vocabulary at probability 0 (what top-p leaves), so p(x) = 0 < q(x) and q(x) = 0 < p(x) occur."""
    scale = 0.5 if shape == "flat" else 4.0
    logits = scale * torch.randn(vocab, generator=generator, dtype=torch.float64)
    if shape == "masked":
        drop = torch.rand(vocab, generator=generator, dtype=torch.float64) < 1 / 3
        drop[logits.argmax()] = False  # at least one token left
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


CASES = ([(v, shape) for v in (2, 8, 64, 479) for shape in ("flat", "peaked")]
         + [(v, shape) for v in (8, 64, 479) for shape in ("masked", "close")])


def _pair(vocab: int, shape: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target p, draft q): independent draws, or (``close``) q = p's logits + N(0, 0.3²) noise, like a trained
    draft."""
    g = torch.Generator().manual_seed(seed)
    if shape == "close":
        logits = 2.0 * torch.randn(vocab, generator=g, dtype=torch.float64)
        return logits.softmax(-1), (logits + 0.3 * torch.randn(vocab, generator=g, dtype=torch.float64)).softmax(-1)
    return _distribution(vocab, shape, g), _distribution(vocab, shape, g)


def _speculative_step(p: torch.Tensor, q: torch.Tensor, n: int, g: torch.Generator,
                      residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent steps of the rule, straight from the definition: (accepted (n,) bool, output token (n,)).
    ``residual`` is the distribution drawn from on rejection (the rule's own, norm(max(0, p − q)), by default)."""
    x = torch.multinomial(q, n, replacement=True, generator=g)  # draft proposals x ~ q
    u = torch.rand(n, generator=g, dtype=torch.float64)
    accepted = u < (p[x] / q[x])  # probability min(1, p(x)/q(x)); q(x) > 0 for every drawn x
    if residual is None:
        residual = (p - q).clamp_min(0)
    if residual.sum() > 0:  # p = q leaves no residual, and then nothing is ever rejected
        y = torch.multinomial(residual / residual.sum(), n, replacement=True, generator=g)
        return accepted, torch.where(accepted, x, y)
    return accepted, x


@pytest.mark.parametrize("vocab, shape", CASES, ids=[f"V{v}-{s}" for v, s in CASES])
def test_acceptance_frequency_is_the_overlap_of_p_and_q(vocab, shape):
    p, q = _pair(vocab, shape, seed=vocab)
    alpha = float(expected_acceptance(q.log()[None], p.log()[None])[0])  # (draft_logp, target_logp)
    accepted, _ = _speculative_step(p, q, N_DRAWS, torch.Generator().manual_seed(1))
    frequency = accepted.double().mean().item()
    sigma = math.sqrt(alpha * (1 - alpha) / N_DRAWS)  # binomial standard error of the frequency
    assert abs(frequency - alpha) <= SIGMAS * sigma, (frequency, alpha)
    # N is large enough that plausible wrong formulas for α lie ≥ 2 × 5σ away on every case, so they fail the
    # bound.
    kl = float(torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum())  # KL(p‖q); inf: q misses p
    wrong = {"sum of max": float(torch.maximum(p, q).sum()), "1 - KL(p||q)": max(0.0, 1 - kl),
             "1 - L1 (no 1/2)": 1 - float((p - q).abs().sum())}
    for name, value in wrong.items():
        assert abs(value - alpha) > 2 * SIGMAS * sigma, name


def _chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic of observed ``counts`` against n·probs, with bins expected below 5 pooled into one
    (tokens of probability 0 must not be observed at all); (statistic, degrees of freedom)."""
    expected = n * probs
    if bool((counts[probs == 0] > 0).any()):
        return math.inf, 1
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def _chi_square_bound(dof: int, z: float = 5.0) -> float:
    """Upper quantile of χ²(dof) at the normal deviate z (Wilson–Hilferty; z = 5: a false alarm once in ~3.5M)."""
    c = 2 / (9 * dof)
    return dof * (1 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize("vocab, shape", CASES, ids=[f"V{v}-{s}" for v, s in CASES])
def test_output_token_is_distributed_as_the_target(vocab, shape):
    p, q = _pair(vocab, shape, seed=100 + vocab)
    _, out = _speculative_step(p, q, N_DRAWS, torch.Generator().manual_seed(2))
    stat, dof = _chi_square(torch.bincount(out, minlength=vocab).double(), p, N_DRAWS)
    assert stat <= _chi_square_bound(dof), (stat, dof)
    # The plausible bug: on rejection, draw from p itself instead of the residual max(0, p − q).
    _, wrong = _speculative_step(p, q, N_DRAWS, torch.Generator().manual_seed(2), residual=p)
    wrong_stat, wrong_dof = _chi_square(torch.bincount(wrong, minlength=vocab).double(), p, N_DRAWS)
    assert wrong_stat > _chi_square_bound(wrong_dof), (wrong_stat, wrong_dof)


def _simulated_tokens_per_call(alpha: float, gamma: int, n: int, g: torch.Generator) -> torch.Tensor:
    """(n,) tokens one target call commits: each of the γ drafts is accepted independently with probability α;
    the round stops at the first rejection; + 1 (the target's correction, or its bonus token when all γ pass)."""
    accepts = torch.rand(n, gamma, generator=g, dtype=torch.float64) < alpha  # (n, γ)
    accepted_prefix = accepts.long().cumprod(-1).sum(-1)  # accepted before the first rejection
    return (accepted_prefix + 1).double()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_tokens_per_call_matches_the_geometric_process(alpha, gamma):
    tokens = _simulated_tokens_per_call(alpha, gamma, N_DRAWS, torch.Generator().manual_seed(3))
    mean, sigma = tokens.mean().item(), tokens.std().item() / math.sqrt(N_DRAWS)
    tau = tokens_per_call(alpha, gamma)
    if alpha in (0.0, 1.0):  # a deterministic process: exactly 1 or γ + 1 tokens every round
        assert tokens.eq(tau).all()
    else:
        assert abs(mean - tau) <= SIGMAS * sigma, (mean, tau)


@pytest.mark.parametrize("alpha, gamma", [(0.7, 4), (0.95, 8)])
def test_tokens_per_call_simulation_rejects_plausible_wrong_formulas(alpha, gamma):
    """No bonus token, the exponent off by one, γ·α + 1: each lies > 5σ from the simulated mean."""
    tokens = _simulated_tokens_per_call(alpha, gamma, N_DRAWS, torch.Generator().manual_seed(3))
    mean, sigma = tokens.mean().item(), tokens.std().item() / math.sqrt(N_DRAWS)
    tau = tokens_per_call(alpha, gamma)
    for wrong in (tau - 1, (1 - alpha ** gamma) / (1 - alpha), gamma * alpha + 1):
        assert abs(mean - wrong) > SIGMAS * sigma, wrong


# ---- potstill's rejection rule (decode.rejection_step), one draft per round (g = 1) ---------------------------------

SMALL_CASES = ([(v, shape) for v in (2, 8, 64) for shape in ("flat", "peaked")]
               + [(v, shape) for v in (8, 64) for shape in ("masked", "close")])


def _potstill_round(p: torch.Tensor, q: torch.Tensor, bonus_p: torch.Tensor, n: int,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """n rounds of ``rejection_step`` with γ = 1 in one batched call: the draft proposes x ~ q, the target's rows are
    (p, bonus_p). Returns (accepted (n,) bool, first committed token (n,): x if accepted else the correction, the
    step's token (n,): the correction, or the bonus after an acceptance, expected (n,))."""
    x = torch.multinomial(q, n, replacement=True, generator=g)
    target_logp = torch.stack([p, bonus_p]).log()[None].expand(n, 2, -1)  # (n, 2, V), a view
    draft_logp = q.log()[None, None].expand(n, 1, -1)  # (n, 1, V)
    accepted, token, expected = rejection_step(target_logp, draft_logp, x[:, None], g)
    accepted = accepted.bool()
    return accepted, torch.where(accepted, x, token), token, expected[:, 0]


def _bonus_distribution(vocab: int, seed: int) -> torch.Tensor:
    """p_2, the target's next-position distribution the bonus token is drawn from: unlike p_1, so a bonus drawn
    from the wrong row shows."""
    return _distribution(vocab, "peaked", torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vocab, shape", SMALL_CASES, ids=[f"V{v}-{s}" for v, s in SMALL_CASES])
def test_rejection_step_accepts_with_the_overlap_of_p_and_q(vocab, shape):
    """potstill's accept decision: frequency within 5σ of α = Σ min(p, q) over N_DRAWS rounds (the naive rule
    passes the same bound), and the α it reports is Σ min(p, q) itself."""
    p, q = _pair(vocab, shape, seed=vocab)
    alpha = float(expected_acceptance(q.log()[None], p.log()[None])[0])
    sigma = math.sqrt(alpha * (1 - alpha) / N_DRAWS)
    naive, _ = _speculative_step(p, q, N_DRAWS, torch.Generator().manual_seed(1))
    assert abs(naive.double().mean().item() - alpha) <= SIGMAS * sigma
    accepted, _, _, expected = _potstill_round(p, q, _bonus_distribution(vocab, 7), N_DRAWS,
                                               torch.Generator().manual_seed(1))
    frequency = accepted.double().mean().item()
    assert abs(frequency - alpha) <= SIGMAS * sigma, (frequency, alpha)
    assert expected[0].item() == pytest.approx(alpha, rel=1e-5) and bool((expected == expected[0]).all())


@pytest.mark.parametrize("vocab, shape", SMALL_CASES, ids=[f"V{v}-{s}" for v, s in SMALL_CASES])
def test_rejection_step_commits_tokens_distributed_as_the_target(vocab, shape):
    """potstill's rule: the first committed token (the accepted draft or the correction) is distributed as p_1, and
    the bonus token after an acceptance as p_2 (χ² at 5σ over N_DRAWS rounds; the naive rule passes the first)."""
    p, q = _pair(vocab, shape, seed=100 + vocab)
    bonus_p = _bonus_distribution(vocab, 200 + vocab)
    _, naive = _speculative_step(p, q, N_DRAWS, torch.Generator().manual_seed(2))
    stat, dof = _chi_square(torch.bincount(naive, minlength=vocab).double(), p, N_DRAWS)
    assert stat <= _chi_square_bound(dof), (stat, dof)
    accepted, first, token, _ = _potstill_round(p, q, bonus_p, N_DRAWS, torch.Generator().manual_seed(2))
    stat, dof = _chi_square(torch.bincount(first, minlength=vocab).double(), p, N_DRAWS)
    assert stat <= _chi_square_bound(dof), ("first token", stat, dof)
    n_bonus = int(accepted.sum())
    stat, dof = _chi_square(torch.bincount(token[accepted], minlength=vocab).double(), bonus_p, n_bonus)
    assert stat <= _chi_square_bound(dof), ("bonus token", stat, dof)
