"""Sampled (RS-KD) targets are unbiased for forward KL's gradient; top-k + tail targets are not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits, Sampled, TopKTail
from potstill.cache.format import CacheSpec, compact_samples, encode_chunk, finish_example, proposal_cdf
from potstill.cache.targets import sampled_weights

N, V, H = 12, 40, 8


def _problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), 2 * torch.randn(N, V, generator=g)


def _loss_and_grad(hidden, weight, target):
    h = hidden.clone().requires_grad_()
    labels = torch.zeros(N, dtype=torch.long)
    out = fused_loss(h, weight, None, labels, parse_objective("fkl"), target)
    out.total.backward()
    return out.total.item(), h.grad


def _sampled_target(teacher_logits, spec, seed):
    """The cache's own sampling path: inverse-CDF draws, then unique ids with counts."""
    uniforms = torch.rand((N, spec.samples), generator=torch.Generator().manual_seed(seed))
    enc = encode_chunk(teacher_logits, spec, uniforms)
    per_draw = {k: v for k, v in enc.items() if k != "draws"}
    stored = {k: (v.float() if k != "ids" else v) for k, v in compact_samples(enc["draws"], per_draw).items()}
    return Sampled(stored["ids"], sampled_weights(stored, spec), spec.temperature)


@pytest.mark.parametrize("proposal", [None, 2.0])
def test_sampled_estimate_converges_to_dense_fkl(proposal):
    hidden, weight, teacher = _problem()
    dense_value, dense_grad = _loss_and_grad(hidden, weight, DenseLogits(teacher))
    entropy = -(F.softmax(teacher, -1) * F.log_softmax(teacher, -1)).sum().item()
    spec = CacheSpec(mode="sample", vocab=V, samples=64, proposal_temperature=proposal)
    errors = {}
    for repeats in (4, 256):
        values, grads = zip(*(_loss_and_grad(hidden, weight, _sampled_target(teacher, spec, seed)) for seed in range(repeats)))
        mean_grad = torch.stack(grads).mean(0)
        errors[repeats] = ((mean_grad - dense_grad).norm() / dense_grad.norm()).item()
        value_error = abs(sum(values) / repeats - (dense_value + entropy)) / (dense_value + entropy)
    assert errors[256] < 0.05 and errors[256] < errors[4] / 3, errors  # Monte-Carlo error shrinks ~1/sqrt(n)
    assert value_error < 0.02  # the estimate is of H(p, q) = KL(p‖q) + H(p)


def test_topk_target_stays_biased():
    hidden, weight, teacher = _problem()
    _, dense_grad = _loss_and_grad(hidden, weight, DenseLogits(teacher))
    _, topk_grad = _loss_and_grad(hidden, weight, TopKTail.from_logits(teacher, 3))
    assert ((topk_grad - dense_grad).norm() / dense_grad.norm()).item() > 0.05  # no amount of data removes it


def test_sampled_target_refuses_terms_it_cannot_estimate():
    hidden, weight, teacher = _problem()
    target = _sampled_target(teacher, CacheSpec(mode="sample", vocab=V, samples=8), 0)
    with pytest.raises(ValueError, match="rkl need the full teacher distribution"):
        fused_loss(hidden, weight, None, torch.zeros(N, dtype=torch.long), parse_objective("rkl"), target)


# ---- draw and weight precision at a real vocabulary size -------------------------------------------------------

BIG_V = 131_072
LEVELS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9)  # tail probabilities, below a head of 50 likely ids
PER_LEVEL = (200, 1_000, 5_000, 20_000, 40_000, 40_000)  # ids per level; the last level takes the rest


def _levelled_logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits (V,) of a distribution whose ids sit on a few probability levels (so that a per-id bias shows
    up summed over thousands of ids), the head first as in BPE vocabularies (frequent tokens have low ids): the
    tail lives where the CDF is above 1/2. Returns (logits, exact float64 probabilities, level index per id)."""
    counts = list(PER_LEVEL) + [BIG_V - 50 - sum(PER_LEVEL)]
    tail = torch.cat([torch.full((n,), p, dtype=torch.float64) for n, p in zip(counts, LEVELS)])
    level = torch.cat([torch.full((50,), -1)] + [torch.full((n,), i) for i, n in enumerate(counts)])
    perm = 50 + torch.randperm(BIG_V - 50, generator=torch.Generator().manual_seed(3))
    probs = torch.cat([torch.full((50,), (1 - float(tail.sum())) / 50, dtype=torch.float64), tail])
    probs[perm], level[perm] = probs[50:].clone(), level[50:].clone()  # shuffle the tail
    logits = probs.log().float()
    exact = (logits.double() - logits.double().logsumexp(-1)).exp()  # what the fp32 logits really say
    return logits, exact, level


def test_every_id_with_positive_probability_has_an_interval_at_large_vocab():
    logits = 3 * torch.randn(BIG_V, generator=torch.Generator().manual_seed(0))
    tiny = torch.arange(BIG_V - 1000, BIG_V)  # at the top of the CDF, where rounding is coarsest
    logits[tiny] = logits.max() + torch.linspace(-29.9, -18.4, 1000)  # p / p_max from 1e-13 to 1e-8
    logits[:7] = float("-inf")  # p = 0: never drawn
    spec = CacheSpec(mode="sample", vocab=BIG_V, samples=8)
    exact = (logits.double() - logits.double().logsumexp(-1)).exp()
    cdf = proposal_cdf(logits[None], spec)[0]
    width = torch.diff(cdf, prepend=cdf.new_zeros(1))  # the interval of each id in the code's own CDF
    assert bool((width[exact > 0] > 0).all()) and bool((width[:7] == 0).all())
    assert float(exact[tiny].min()) < 1e-14  # far below fp32's resolution of the CDF near 1 (6e-8)
    assert bool(((width - exact).abs() <= 2**-50).all())  # float64: each interval is exact to ~4 ulp of 1
    # uniforms forced into the middle of each tiny interval draw exactly that id
    middle = (cdf[tiny] - width[tiny] / 2) / cdf[-1]
    draws = encode_chunk(logits[None], spec, middle[None])["draws"][0]
    assert torch.equal(draws, tiny)


def test_draw_frequencies_match_probabilities_per_level_at_large_vocab():
    """2^22 draws from one distribution over 131,072 ids (one test of many positions sharing a distribution).
    First moment: each probability level gets its share of draws (chi-square, 7 degrees of freedom). Second
    moment, for levels whose ids expect < 1 draw each: pairs of draws landing on the same id are Poisson with mean
    N(N−1)/2 · Σ p². An fp32 CDF (ulp 6e-8 near 1) keeps each level's total right on average but gives an id of
    p = 1e-8 a width of 0 or 6e-8, so that level's draws clump on 1 id in 6: 6× the pairs (z ≈ 30; measured with
    the fp32 line swapped in). Exact draws give |z| < 2 here; the bound is 5. Fixed seeds: deterministic."""
    logits, exact, level = _levelled_logits()
    rows, per_row = 16, 1 << 18
    spec = CacheSpec(mode="sample", vocab=BIG_V, samples=8)
    uniforms = torch.rand((rows, per_row), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    draws = encode_chunk(logits.expand(rows, BIG_V), spec, uniforms)["draws"]
    hits = torch.bincount(draws.reshape(-1), minlength=BIG_V).double()
    n = rows * per_row
    groups = [level == i for i in range(-1, len(LEVELS))]
    observed = torch.stack([hits[g].sum() for g in groups])
    expected = torch.stack([n * exact[g].sum() for g in groups])
    z = (observed - expected) / expected.sqrt()
    assert float(expected.min()) > 80  # every level is well populated: the normal approximation holds
    assert float((z**2).sum()) < 40, z  # P(chi2_7 > 40) ≈ 1e-6
    pairs = torch.stack([(hits[g] * (hits[g] - 1)).sum() / 2 for g in groups])
    expected_pairs = torch.stack([n * (n - 1) / 2 * (exact[g] ** 2).sum() for g in groups])
    sparse = (expected / torch.stack([g.sum() for g in groups]) < 1) & (expected_pairs > 20)  # levels 1e-7, 1e-8
    assert int(sparse.sum()) == 2
    pair_z = (pairs - expected_pairs)[sparse] / expected_pairs[sparse].sqrt()
    assert bool((pair_z.abs() < 5).all()), pair_z


def test_importance_weights_are_exact_at_large_vocab():
    """A proposal at T_r = 2 for p at T = 1: the weight count/K · exp(log_ratio) reproduces count/K · p/r computed
    in float64 from the logits, to 2^-24·(|log p/r| + 4) relative (fp32 storage of the log and fp32 exp)."""
    logits = 3 * torch.randn(4, BIG_V, generator=torch.Generator().manual_seed(5))
    spec = CacheSpec(mode="sample", vocab=BIG_V, samples=255, temperature=1.0, proposal_temperature=2.0)
    uniforms = torch.rand((4, spec.samples), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    stored = {k: v.float() if k != "ids" else v for k, v in finish_example([encode_chunk(logits, spec, uniforms)], spec).items()}
    ids = stored["ids"].long()
    z = logits.double()
    exact_ratio = (F.log_softmax(z, -1) - F.log_softmax(z / 2, -1)).gather(-1, ids)
    exact = stored["counts"].double() / spec.samples * exact_ratio.exp()
    got = sampled_weights(stored, spec).double()
    used = stored["counts"] > 0
    assert float(exact_ratio[used].abs().max()) > 5  # weights far from 1 occur
    bound = 2**-24 * (exact_ratio.abs() + 4) * exact
    assert bool(((got - exact).abs() <= bound)[used].all())
    assert bool((got[~used] == 0).all())
