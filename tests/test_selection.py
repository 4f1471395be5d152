"""Token selection: exact kept sets and weights, and the fused path applying them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.losses.chunked import fused_loss, token_statistics
from potstill.losses.objective import parse_objective
from potstill.losses.selection import SELECTORS, selection_weights, top_fraction
from potstill.losses.targets import DenseLogits


def test_top_fraction_exact():
    score = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 9.0])
    valid = torch.tensor([True, True, True, True, True, False])  # the invalid 9.0 must never be picked
    assert top_fraction(score, valid, 0.4).tolist() == [0, 0, 0, 1, 1, 0]
    assert top_fraction(score, valid, 1.0).tolist() == [1, 1, 1, 1, 1, 0]
    assert top_fraction(score, torch.zeros(6, dtype=torch.bool), 0.5).tolist() == [0] * 6


def _batch(n=30, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, 6, generator=g), torch.randn(v, 6, generator=g)
    teacher = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:4] = -100
    return hidden, weight, teacher, labels


def test_statistics_match_naive_definitions():
    hidden, weight, teacher, labels = _batch()
    stats = token_statistics(hidden, weight, None, labels, DenseLogits(teacher), chunk_size=7)
    q, p = F.softmax(hidden @ weight.T, -1), F.softmax(teacher, -1)
    torch.testing.assert_close(stats.student_entropy, -(q * q.log()).sum(-1))
    torch.testing.assert_close(stats.kl_teacher_student, (p * (p / q).log()).sum(-1))
    idx = labels.clamp_min(0)
    torch.testing.assert_close(stats.student_nll, -q.log()[torch.arange(30), idx])


TOP_FRACTION_SELECTORS = ["entropy", "divergence", "reference"]


def test_every_selector_is_tested():
    assert sorted(TOP_FRACTION_SELECTORS + ["tip", "tsd", "iw_opd"]) == SELECTORS.names()  # iw_opd: test_iw_opd.py


def _stats(chunk=64):
    hidden, weight, teacher, labels = _batch()
    reference = DenseLogits(teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(9)))
    return token_statistics(hidden, weight, None, labels, DenseLogits(teacher), chunk, reference), labels


@pytest.mark.parametrize("name", TOP_FRACTION_SELECTORS)
def test_weights_average_one_on_labelled_tokens(name):
    stats, labels = _stats()
    w = selection_weights(stats, name, {"keep": 0.25})
    assert (w[labels == -100] == 0).all()
    assert w[labels != -100].mean().item() == pytest.approx(1.0)
    kept = int((w > 0).sum())
    assert kept == round(0.25 * 26)  # 26 labelled tokens
    assert torch.allclose(w[w > 0], torch.full((kept,), 26 / kept))


def test_reference_selector_keeps_largest_gap():
    stats, labels = _stats()
    gap = (stats.kl_teacher_student - stats.reference_kl).masked_fill(labels == -100, float("-inf"))
    w = selection_weights(stats, "reference", {"keep": 0.5})
    assert set(torch.nonzero(w).flatten().tolist()) == set(gap.topk(13).indices.tolist())


def test_tsd_weights_are_sigmoid_of_entropy_gap():
    stats, labels = _stats()
    raw = torch.sigmoid(stats.student_entropy - stats.teacher_entropy) * (labels != -100)
    torch.testing.assert_close(selection_weights(stats, "tsd", {}), raw * 26 / raw.sum())


def test_tip_keeps_high_entropy_half_and_overconfident_wrong():
    stats, labels = _stats()
    valid = labels != -100
    median = stats.student_entropy[valid].median()
    low = valid & (stats.student_entropy < median)
    w_q3 = selection_weights(stats, "tip", {"keep": 0.5, "high_entropy": 0.0})
    kept = torch.nonzero(w_q3).flatten().tolist()
    div_low = stats.kl_teacher_student.masked_fill(~low, float("-inf"))
    assert set(kept) == set(div_low.topk(round(0.5 * int(low.sum()))).indices.tolist())
    w_all = selection_weights(stats, "tip", {"keep": 0.5, "high_entropy": 1.0})
    assert set(torch.nonzero(w_all).flatten().tolist()) == set(kept) | set(torch.nonzero(valid & ~low).flatten().tolist())


def test_fused_loss_with_selection_equals_manual_weights():
    hidden, weight, teacher, labels = _batch()
    selected = parse_objective("fkl", select="divergence(keep=0.5)")
    plain = parse_objective("fkl")
    out = fused_loss(hidden, weight, None, labels, selected, DenseLogits(teacher), chunk_size=8)
    q, p = F.log_softmax(hidden @ weight.T, -1), F.log_softmax(teacher, -1)
    kl = (p.exp() * (p - q)).sum(-1).masked_fill(labels == -100, float("-inf"))
    manual = torch.zeros(30)
    manual[kl.topk(13).indices] = 26 / 13
    ref = fused_loss(hidden, weight, None, labels, plain, DenseLogits(teacher), token_weight=manual)
    assert out.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    assert out.n_kept == 13 and out.n_valid == 26


def test_selection_needs_a_teacher_term():
    with pytest.raises(ValueError, match="needs a teacher term"):
        parse_objective("ce", select="entropy(keep=0.5)")
