"""Sampled (RS-KD) targets are unbiased for forward KL's gradient; top-k + tail targets are not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits, Sampled, TopKTail
from potstill.cache.format import CacheSpec, compact_samples, encode_chunk
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
