"""Multi-teacher KD, the arithmetic: mixture weights per mode (hand-computed numbers), positions → examples, and the
mixture target p_mix = Σ w_k p_k against a naive reference through the fused loss (value and gradient)."""
from __future__ import annotations

import math

import pytest
import torch

from potstill.losses.chunked import fused_loss
from potstill.losses.mixture import Mixture
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits, TeacherHidden, TopKTail
from potstill.multiteacher import weights as W


def test_fixed_weights_are_the_configured_weights_normalised():
    assert W.fixed_weights(torch.tensor([1.0, 3.0]), 2).tolist() == [[0.25, 0.75], [0.25, 0.75]]


def test_confidence_weights_are_base_times_exp_mean_label_logprob():
    w = W.confidence_weights(torch.tensor([1.0, 1.0]), torch.tensor([[-1.0, -2.0], [0.0, -math.log(3.0)]]))
    assert w[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))], rel=1e-6)
    assert w[1].tolist() == pytest.approx([0.75, 0.25], rel=1e-6)
    skewed = W.confidence_weights(torch.tensor([1.0, 3.0]), torch.tensor([[0.0, -math.log(3.0)]]))
    assert skewed[0].tolist() == pytest.approx([0.5, 0.5], rel=1e-6)  # w0 = 1:3 against likelihood 3:1


def test_correctness_weights_zero_wrong_teachers_and_fall_back_to_base():
    base = torch.tensor([0.5, 0.25, 0.25])
    correct = torch.tensor([[True, False, True], [False, False, False], [True, True, True], [False, True, False]])
    checkable = torch.tensor([True, True, False, True])
    w = W.correctness_weights(base, correct, checkable)
    assert w[0].tolist() == pytest.approx([2 / 3, 0.0, 1 / 3], rel=1e-6)
    assert w[1].tolist() == pytest.approx([0.5, 0.25, 0.25], rel=1e-6)  # nobody right: w0
    assert w[2].tolist() == pytest.approx([0.5, 0.25, 0.25], rel=1e-6)  # not checkable: w0
    assert w[3].tolist() == pytest.approx([0.0, 1.0, 0.0], rel=1e-6)
    only_zero_weight_right = W.correctness_weights(torch.tensor([1.0, 0.0]), torch.tensor([[False, True]]), torch.tensor([True]))
    assert only_zero_weight_right[0].tolist() == [1.0, 0.0]


def test_ddk_update_and_weights_hand_computed():
    factors = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    student_ce = torch.tensor([2.0, 3.0])
    teacher_ce = torch.tensor([[1.0, 4.0], [3.0, 3.0]])
    r = W.ddk_update(factors, student_ce, teacher_ce, alpha=0.5)
    psi = 1 / (1 + math.exp(-1.5))  # softmax(2, 0.5)
    assert r[0].tolist() == pytest.approx([0.5 * psi + 0.25, 0.5 * (1 - psi) + 0.25], rel=1e-6)
    assert r[1].tolist() == pytest.approx([0.5, 0.5], rel=1e-6)
    again = W.ddk_update(r, student_ce, teacher_ce, alpha=1.0)  # the factor compounds: ψ ∝ r · exp(ℓ_S / ℓ_k)
    expected = r[0] * torch.exp(torch.tensor([2.0, 0.5]))
    assert again[0].tolist() == pytest.approx((expected / expected.sum()).tolist(), rel=1e-6)
    w = W.ddk_weights(torch.tensor([3.0, 1.0]), r, torch.tensor([1, 0]))
    assert w[0].tolist() == pytest.approx([0.75, 0.25], rel=1e-6)
    first = torch.tensor([3 * r[0, 0], r[0, 1]])
    assert w[1].tolist() == pytest.approx((first / first.sum()).tolist(), rel=1e-6)


def test_route_weights_are_one_hot():
    assert W.route_weights(torch.tensor([1, 0, 1]), 3).tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0]]


def test_positions_belong_to_their_packed_example():
    segments = torch.tensor([[0, 0, 3], [0, 3, 2], [1, 0, 4]])  # (row, start, length)
    owner = W.example_positions(segments, (2, 5))
    assert owner.tolist() == [0, 0, -1, 1, -1, 2, 2, 2, -1, -1]
    ew = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    lw = W.position_log_weights(ew, owner).exp()
    assert lw[3].tolist() == [0.5, 0.5] and lw[5].tolist() == [0.0, 1.0]
    assert lw[2].tolist() == pytest.approx([0.5, 0.5])  # no example: the mean row, still a distribution
    mean = W.per_example_mean(torch.arange(10.0), torch.tensor([True] * 9 + [False]), owner, 3)
    assert mean.tolist() == [0.5, 3.0, 6.0]


def _setup(seed=0, n=7, v=11, h=5, k_teachers=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float()
    head = torch.randn(v, h, generator=g).float()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    logits = [torch.randn(n, v + 2, generator=g) * 2 for _ in range(k_teachers)]  # 2 padded rows: trimmed
    w = torch.rand(n, k_teachers, generator=g) + 0.1
    w[1, 0] = 0.0  # a position where teacher 0 has no weight
    return hidden, head, labels, logits, w / w.sum(-1, keepdim=True)


def _naive_fkl(hidden, head, labels, logits, w, tau):
    """Σ over labelled positions of T²·KL(p_mix ‖ q) with p_mix = Σ_k w_k softmax(z_k[:V] / T), in float64."""
    v = head.shape[0]
    p = sum(w[:, k : k + 1].double() * torch.softmax(z[:, :v].double() / tau, -1) for k, z in enumerate(logits))
    logq = torch.log_softmax((hidden.double() @ head.double().T) / tau, -1)
    kl = (p * (p.clamp_min(1e-300).log() - logq)).sum(-1)
    return (kl * (labels != -100)).sum() * tau**2


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_mixture_target_matches_the_naive_mixture_in_value_and_gradient(tau):
    hidden, head, labels, logits, w = _setup()
    obj = parse_objective("fkl", tau)
    # one live-like teacher (hidden states + head) and two dense ones, one of them a cache already at T
    g = torch.Generator().manual_seed(1)
    t_hidden, t_head = torch.randn(7, 4, generator=g), torch.randn(13, 4, generator=g)
    logits[0] = t_hidden @ t_head.T
    cached = DenseLogits(torch.log_softmax(logits[2][:, :11] / tau, -1), temperature=tau)
    components = [TeacherHidden(t_hidden, t_head), DenseLogits(logits[1]), cached]
    h1, w1 = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    out = fused_loss(h1, w1, None, labels, obj, Mixture(components, w.log(), 11, tau), chunk_size=3)
    out.total.backward()
    h2, w2 = hidden.double().requires_grad_(), head.double().requires_grad_()
    ref = _naive_fkl(h2, w2, labels, logits, w, tau)
    ref.backward()
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad.float(), rtol=1e-4, atol=1e-6)


def test_a_teacher_without_weight_is_never_read_and_changes_nothing():
    hidden, head, labels, logits, _ = _setup(k_teachers=2)
    obj = parse_objective("0.5*ce + gjsd(beta=0.5)", 1.0)
    only_first = torch.log(torch.tensor([[1.0, 0.0]]).expand(7, -1))
    mixed = fused_loss(hidden, head, None, labels, obj, Mixture([DenseLogits(logits[0]), None], only_first, 11, 1.0))
    alone = fused_loss(hidden, head, None, labels, obj, DenseLogits(logits[0][:, :11]))
    assert mixed.total.item() == pytest.approx(alone.total.item(), rel=1e-5)


def test_a_mixture_refuses_what_it_cannot_mix():
    topk = TopKTail.from_logits(torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="teacher 1 of a mixture is a TopKTail: mixing needs dense teachers"):
        Mixture([DenseLogits(torch.randn(3, 5)), topk], torch.zeros(3, 2), 5, 1.0)
    with pytest.raises(ValueError, match="at least one teacher with weight > 0"):
        Mixture([None, None], torch.zeros(3, 2), 5, 1.0)
    with pytest.raises(ValueError, match="2 teachers but 3 weight columns"):
        Mixture([None, None], torch.zeros(3, 3), 5, 1.0)
