"""Model-agnostic use: the registered divergences work on classifier logits of shape (B, C), both as pure
functions and through the fused path (pooled hidden states (B, H) and the classifier's weight (C, H))."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForSequenceClassification

import potstill
from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits


def _classifier(seed, hidden, layers):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=5, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


@pytest.mark.parametrize("name", ["fkl", "rkl", "gjsd", "skl", "srkl", "tvd", "akl", "taid"])
def test_student_classifier_learns_teacher_distribution(name):
    teacher, student = _classifier(0, 32, 2).eval(), _classifier(1, 16, 1)
    inputs = torch.randint(1, 50, (32, 12))
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher(inputs).logits * 3, -1)  # (B, C), sharpened to be learnable
    fn = potstill.divergence(name)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = fn(F.log_softmax(student(inputs).logits, -1), teacher_logp).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (name, first, loss.item())


def test_fused_path_on_classifier_logits_matches_pure_function():
    torch.manual_seed(0)
    pooled = torch.randn(8, 16, requires_grad=True)  # (B, H) pooled hidden states
    score = torch.randn(5, 16, requires_grad=True)  # (C, H) classifier head
    teacher_logits = torch.randn(8, 5)
    labels = torch.randint(0, 5, (8,))  # any valid label marks the example as counted
    out = fused_loss(pooled, score, None, labels, parse_objective("gjsd(beta=0.3)"), DenseLogits(teacher_logits))
    ref = potstill.divergence("gjsd", beta=0.3)(F.log_softmax(pooled @ score.T, -1), F.log_softmax(teacher_logits, -1)).sum()
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-6)
