"""IW-OPD position reweighting (loss.select=iw_opd): weights against the definition, row by row, and the fused
path applying them to the sampled-token term."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.config import RunConfig
from potstill.losses.chunked import fused_loss, token_statistics
from potstill.losses.objective import parse_objective
from potstill.losses.selection import prefix_sums, selection_weights
from potstill.losses.targets import DenseLogits


def _batch(b=3, t=9, h=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(b, t, h, generator=g), torch.randn(v, h, generator=g)
    teacher = 2 * torch.randn(b * t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    labels[2, 4] = -100  # a gap inside a sequence
    return hidden, weight, teacher, labels


def _iw_opd_reference(hidden, weight, teacher, labels, gamma):
    """TRL's IWOPDTrainer weights, row by row: A_t = log p(y_t) − log q(y_t) on labelled tokens (0 elsewhere),
    w_t = 1 + γ·(1 − Σ_{k<t}|A_k| / max(Σ_k |A_k|, 1e-8)); then scaled to mean 1 over labelled tokens."""
    logq = F.log_softmax(hidden.reshape(-1, hidden.shape[-1]) @ weight.T, -1)
    logp = F.log_softmax(teacher, -1)
    y = labels.reshape(-1).clamp_min(0)[:, None]
    gap = (logp.gather(-1, y) - logq.gather(-1, y)).squeeze(-1).abs().view(labels.shape).tolist()
    raw = torch.zeros(labels.shape)
    for row in range(labels.shape[0]):
        labelled = [t for t in range(labels.shape[1]) if labels[row, t] != -100]
        total = max(sum(gap[row][t] for t in labelled), 1e-8)
        before = 0.0
        for t in labelled:
            raw[row, t] = 1 + gamma * (1 - before / total)
            before += gap[row][t]
    raw = raw.reshape(-1)
    return raw * (labels != -100).sum() / raw.sum()


@pytest.mark.parametrize("gamma", [0.5, 3.0])
def test_iw_opd_weights_follow_the_definition_per_sequence(gamma):
    hidden, weight, teacher, labels = _batch()
    sequence = torch.arange(3).repeat_interleave(9)
    stats = token_statistics(hidden.reshape(-1, 6), weight, None, labels.reshape(-1), DenseLogits(teacher), 4,
                             sequence=sequence)
    w = selection_weights(stats, "iw_opd", {"gamma": gamma})
    torch.testing.assert_close(w, _iw_opd_reference(hidden, weight, teacher, labels, gamma), rtol=1e-5, atol=0)
    first = [3, 9, 18]  # each sequence's first labelled token carries the largest weight of its row
    assert all(w[i] == w[r * 9:(r + 1) * 9].max() for r, i in enumerate(first))


def test_prefix_sums_restart_per_sequence():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    before, total = prefix_sums(values, torch.tensor([0, 0, 0, 1, 1, 2]))
    assert before.tolist() == [0, 1, 3, 0, 4, 0] and total.tolist() == [6, 6, 6, 9, 9, 6]


def test_fused_loss_applies_iw_opd_to_the_sampled_token_term():
    """(B, T, H) hidden states: the weighted sum Σ w_t·(log q(y_t) − log p(y_t)) with the reference weights."""
    hidden, weight, teacher, labels = _batch()
    objective = parse_objective("opd", select="iw_opd(gamma=0.5)")
    out = fused_loss(hidden, weight, None, labels, objective, DenseLogits(teacher), chunk_size=5)
    w = _iw_opd_reference(hidden, weight, teacher, labels, 0.5)
    y = labels.reshape(-1).clamp_min(0)[:, None]
    logq = F.log_softmax(hidden.reshape(-1, 6) @ weight.T, -1).gather(-1, y).squeeze(-1)
    logp = F.log_softmax(teacher, -1).gather(-1, y).squeeze(-1)
    expected = (w * (logq - logp))[labels.reshape(-1) != -100].sum()
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="iw_opd' needs the batch's sequences"):
        fused_loss(hidden.reshape(-1, 6), weight, None, labels.reshape(-1), objective, DenseLogits(teacher))


def test_iw_opd_is_refused_with_packing():
    with pytest.raises(ValueError, match="loss.select=iw_opd\\(gamma=0.5\\) weighs positions along each row's sequence"):
        RunConfig.from_yaml(None, ["teacher.path=x", "student.config={model_type: llama}", "loss.objective=opd",
                                   "loss.select=iw_opd", "data.packing=true"])
