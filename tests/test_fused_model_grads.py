"""The fused loss inside a real model: gradients on a tied embedding/head, and what token selection does under
gradient accumulation (selection is per micro-batch, see docs/objectives.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits
from potstill.models import hidden_states, output_head


def test_tied_embedding_gradient_equals_dense_reference():
    """Tied weights get two gradient contributions (input embedding and output head); the fused path adds the
    head's in forward and autograd the embedding's: their sum must equal the plain model's."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 41, (3, 12))
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    teacher = 3 * torch.randn(3, 11, 41)
    objective = parse_objective("0.5*ce + fkl", temperature=2.0)

    out = fused_loss(hidden_states(model, ids, mask)[:, :-1], *output_head(model, 41), labels, objective,
                     DenseLogits(teacher.reshape(-1, 41)), chunk_size=7)
    out.total.backward()
    fused_grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()

    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    valid = labels != -100
    ce = -F.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    p, logq = F.softmax(teacher / 2, -1), F.log_softmax(z / 2, -1)
    fkl = (p * (p.log() - logq)).sum(-1) * 4
    ((0.5 * ce + fkl)[valid]).sum().backward()
    dense_grad = model.get_input_embeddings().weight.grad
    assert out.total.item() == pytest.approx(((0.5 * ce + fkl)[valid]).sum().item(), rel=1e-5)
    torch.testing.assert_close(fused_grad, dense_grad, rtol=1e-4, atol=1e-6)


def _selection_data(seed):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(20, 8, generator=g), torch.randn(13, 8, generator=g)
    teacher, labels = 2 * torch.randn(20, 13, generator=g), torch.randint(0, 13, (20,), generator=g)
    labels[[1, 4]] = -100
    return hidden, weight, teacher, labels


def test_selection_is_per_micro_batch():
    """Documented behaviour: each micro-batch keeps the top `keep` fraction of ITS labelled tokens and rescales
    their weights to mean 1 over ITS labelled tokens; with grad_accum > 1 this is not the big batch's selection."""
    hidden, weight, teacher, labels = _selection_data(0)
    objective = parse_objective("fkl", select="entropy(keep=0.3)")
    logq, logp = F.log_softmax(hidden @ weight.T, -1), F.log_softmax(teacher, -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    student_entropy = -(logq.exp() * logq).sum(-1)

    def expected(rows):
        rows = [r for r in rows if labels[r] != -100]
        kept = sorted(rows, key=lambda r: -float(student_entropy[r]))[: round(0.3 * len(rows))]
        return sum(float(per_token[r]) for r in kept) * len(rows) / len(kept)

    micro = [fused_loss(hidden[s], weight, None, labels[s], objective, DenseLogits(teacher[s])).total.item()
             for s in (slice(0, 6), slice(6, 20))]
    assert micro[0] == pytest.approx(expected(range(0, 6)), rel=1e-5)
    assert micro[1] == pytest.approx(expected(range(6, 20)), rel=1e-5)
    big = fused_loss(hidden, weight, None, labels, objective, DenseLogits(teacher)).total.item()
    assert big == pytest.approx(expected(range(20)), rel=1e-5)
    assert sum(micro) != pytest.approx(big, rel=1e-3)  # the two selections differ on this data
