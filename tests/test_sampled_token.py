"""Sampled-token distillation (``opd``, the on-policy distillation recipe): value and gradient against the naive
definition (tests/test_losses.py::_sampled_token_ref), and its expected gradient against the exact reverse-KL
gradient by Monte Carlo over samples from the student (on-policy) and from another sampler (importance weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits, TokenLogprobs
from tests.test_losses import _sampled_token_ref


def _logits(n, v, seed, scale=1.5):
    return scale * torch.randn(n, v, generator=torch.Generator().manual_seed(seed))


def _fused(objective, z, labels, target, sampler_logp=None):
    """The fused loss with the student's logits as its hidden states and an identity head, so the gradient w.r.t.
    the hidden states is the gradient w.r.t. the logits."""
    h = z.clone().requires_grad_()
    out = fused_loss(h, torch.eye(z.shape[-1]), None, labels, objective, target, chunk_size=7, sampler_logp=sampler_logp)
    out.total.backward()
    return out.total.detach(), h.grad


def _label_logp(logits, labels, temperature=1.0):
    return F.log_softmax(logits / temperature, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)


@pytest.mark.parametrize("rho_max", [0.0, 1.5])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["dense", "token"])
def test_value_and_logit_gradient_equal_the_definition(kind, temperature, rho_max):
    n, v = 19, 11
    z, teacher, sampler = _logits(n, v, 0), _logits(n, v, 1, 2.0), _logits(n, v, 2)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    labels[[0, 4]] = -100
    sampler_logp = _label_logp(sampler, labels, temperature)
    sampler_logp[[0, 4]] = float("nan")  # unlabelled positions may hold anything
    target = DenseLogits(teacher) if kind == "dense" else TokenLogprobs(
        torch.where(labels != -100, _label_logp(teacher, labels, temperature), 0.0), temperature)
    objective = parse_objective(f"opd(rho_max={rho_max})", temperature)
    total, grad = _fused(objective, z, labels, target, sampler_logp)
    zr = z.clone().requires_grad_()
    q, p = F.softmax(zr / temperature, -1), F.softmax(teacher / temperature, -1)
    valid = labels != -100
    per = _sampled_token_ref(q, p, labels, torch.where(valid, sampler_logp, 0.0), rho_max)
    ref = (per * temperature**2)[valid].sum()
    ref.backward()
    value = (_label_logp(z, labels, temperature) - _label_logp(teacher, labels, temperature))[valid].sum()
    assert total.item() == pytest.approx(value.item() * temperature**2, rel=1e-5)  # log q(y) − log p(y), T²-scaled
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, zr.grad, rtol=1e-5, atol=1e-7)
    if rho_max > 0:  # the cap is active on some positions, so the test above saw it
        rho = (_label_logp(z, labels, temperature) - sampler_logp).exp()[valid]
        assert (rho > rho_max).any() and (rho < rho_max).any()


def _mc_gradients(z, teacher, draws, sampler_logp):
    """Per-draw gradients w.r.t. the logits (n, M, V) of opd, each position repeated for the M label draws."""
    n, m = draws.shape
    rows = z.repeat_interleave(m, 0)
    target = DenseLogits(teacher.repeat_interleave(m, 0))
    sampler = None if sampler_logp is None else sampler_logp.reshape(-1)
    _, grad = _fused(parse_objective("opd"), rows, draws.reshape(-1), target, sampler)
    return grad.view(n, m, -1)


def _z_scores(grads, exact):
    """Largest |mean − exact| / standard error over all components, and the relative error of the mean."""
    mean, se = grads.mean(1), grads.std(1) / grads.shape[1] ** 0.5
    return ((mean - exact).abs() / se.clamp_min(1e-12)).max().item(), ((mean - exact).norm() / exact.norm()).item()


def test_expected_gradient_is_the_exact_reverse_kl_gradient():
    """On-policy (y ~ q, ρ = 1) and off-policy (y ~ r with r's log-probs given, ρ = q/r): the mean per-draw
    gradient matches ∇_z KL(q‖p) within 5 standard errors on every component (20 components, 20 000 draws each).
    Controls: the same test fails for a flipped sign, and for off-policy draws without the importance weight."""
    n, v, m = 4, 5, 20_000
    z, teacher, other = _logits(n, v, 10), _logits(n, v, 11, 2.0), _logits(n, v, 12)
    zr = z.clone().requires_grad_()
    logq = F.log_softmax(zr, -1)
    (logq.exp() * (logq - F.log_softmax(teacher, -1))).sum().backward()
    exact = zr.grad
    g = torch.Generator().manual_seed(13)
    on_policy = torch.multinomial(F.softmax(z, -1), m, replacement=True, generator=g)
    grads = _mc_gradients(z, teacher, on_policy, None)
    z_max, rel = _z_scores(grads, exact)
    assert z_max < 5 and rel < 0.05, (z_max, rel)
    assert _z_scores(-grads, exact)[0] > 50  # a sign error fails by a wide margin
    off_policy = torch.multinomial(F.softmax(other, -1), m, replacement=True, generator=g)
    sampler_logp = F.log_softmax(other, -1).gather(-1, off_policy)  # (n, M)
    z_max, rel = _z_scores(_mc_gradients(z, teacher, off_policy, sampler_logp), exact)
    assert z_max < 5 and rel < 0.1, (z_max, rel)
    assert _z_scores(_mc_gradients(z, teacher, off_policy, None), exact)[0] > 20  # without ρ: biased


def test_value_is_an_unbiased_estimate_of_reverse_kl():
    """Mean of log q(y) − log p(y) over y ~ q equals KL(q‖p) within 5 standard errors."""
    n, v, m = 4, 5, 20_000
    z, teacher = _logits(n, v, 20), _logits(n, v, 21, 2.0)
    draws = torch.multinomial(F.softmax(z, -1), m, replacement=True, generator=torch.Generator().manual_seed(22))
    logq, logp = F.log_softmax(z, -1), F.log_softmax(teacher, -1)
    per_draw = logq.gather(-1, draws) - logp.gather(-1, draws)  # (n, M), what opd reports per token
    total, _ = _fused(parse_objective("opd"), z.repeat_interleave(m, 0), draws.reshape(-1),
                      DenseLogits(teacher.repeat_interleave(m, 0)))
    assert total.item() == pytest.approx(per_draw.sum().item(), rel=1e-4)
    exact = (logq.exp() * (logq - logp)).sum(-1)
    se = per_draw.std(1) / m**0.5
    assert ((per_draw.mean(1) - exact).abs() / se).max().item() < 5


def test_sampler_logprobs_of_the_student_itself_change_nothing():
    """ρ = q/q = 1: passing the student's own log-probs as the sampler's equals passing none."""
    n, v = 9, 6
    z, teacher = _logits(n, v, 30), _logits(n, v, 31)
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(32))
    a = _fused(parse_objective("opd"), z, labels, DenseLogits(teacher))
    b = _fused(parse_objective("opd"), z, labels, DenseLogits(teacher), _label_logp(z, labels))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
