"""potstill.losses.hidden against naive references written position by position / row by row from the definitions,
in value and gradient."""
from __future__ import annotations

import math

import pytest
import torch

from potstill.losses import hidden


def _naive_position_loss(kind, s, t, mask):
    total = torch.zeros((), dtype=torch.float64)
    for i in range(s.shape[0]):
        if not mask[i]:
            continue
        a, b = s[i].double(), t[i].double()
        if kind == "mse":
            total = total + sum((a[k] - b[k]) ** 2 for k in range(a.shape[0])) / a.shape[0]
        else:
            total = total + 1 - (a @ b) / (a.norm() * b.norm())
    return total


def _naive_relation(s, t, mask, similarity, loss, causal):
    """s (L, T, d_s), t (L, T, d_t), mask (L, T): explicit loops over rows and keys."""
    total = torch.zeros((), dtype=torch.float64)
    L, T = mask.shape
    for l in range(L):
        for i in range(T):
            if not mask[l, i]:
                continue
            keys = [j for j in range(T) if mask[l, j] and (not causal or j <= i)]

            def row(x):
                x = x.double()
                if similarity == "softmax":
                    scores = torch.stack([x[l, i] @ x[l, j] / math.sqrt(x.shape[-1]) for j in keys])
                    return torch.softmax(scores, 0)
                return torch.stack([(x[l, i] @ x[l, j]) / (x[l, i].norm() * x[l, j].norm()) for j in keys])

            rs, rt = row(s), row(t).detach()
            if loss == "kl":
                total = total + (rt * (rt.log() - rs.log())).sum()
            else:
                total = total + ((rs - rt) ** 2).sum() / len(keys)
    return total


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_position_losses_match_naive_value_and_gradient(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 5, generator=g, requires_grad=True)
    t = torch.randn(7, 5, generator=g)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    got = getattr(hidden, kind)(s, t, mask)
    (g_got,) = torch.autograd.grad(got, s)
    ref = _naive_position_loss(kind, s, t, mask)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_ref.float(), rtol=1e-5, atol=1e-7 * g_ref.abs().max().item())
    assert g_got[2].abs().sum() == 0 and g_got[4].abs().sum() == 0  # masked positions get no gradient


def test_position_losses_without_mask_sum_every_position():
    s, t = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    assert hidden.mse(s, t).item() == pytest.approx(((s - t) ** 2).mean(-1).sum().item(), rel=1e-5)


@pytest.mark.parametrize("similarity,loss", [("softmax", "kl"), ("softmax", "mse"), ("cosine", "mse")])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_elements", [1, 13, 10**6])  # one row per block / several rows / everything at once
def test_relation_matches_naive_value_and_gradient(similarity, loss, causal, chunk_elements):
    g = torch.Generator().manual_seed(1)
    B, H, T = 2, 3, 5
    s = torch.randn(B, H, T, 4, generator=g, requires_grad=True)  # widths differ: only T × T relations compared
    t = torch.randn(B, H, T, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)  # (B, T), broadcast over heads
    got = hidden.relation(s, t, mask[:, None, :], similarity=similarity, loss=loss, causal=causal,
                          chunk_elements=chunk_elements)
    (g_got,) = torch.autograd.grad(got, s)
    full_mask = mask[:, None, :].expand(B, H, T).reshape(B * H, T)
    ref = _naive_relation(s.reshape(B * H, T, 4), t.reshape(B * H, T, 6), full_mask, similarity, loss, causal)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_ref.float(), rtol=1e-4, atol=1e-6 * g_ref.abs().max().item())
    assert torch.isfinite(g_got).all()


def test_relation_of_identical_sets_is_zero_and_kl_is_positive_otherwise():
    x = torch.randn(4, 6, 8)
    assert hidden.relation(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden.relation(x, torch.randn(4, 6, 3)).item() > 0


def test_relation_of_embedding_sets_is_one_matrix_over_the_batch():
    """Relational embedding KD: N sentence vectors, one N × N cosine matrix, MSE = mean over all entries · N."""
    s, t = torch.randn(6, 8), torch.randn(6, 16)
    got = hidden.relation(s, t, similarity="cosine", loss="mse")
    cs = torch.nn.functional.normalize(s, dim=-1) @ torch.nn.functional.normalize(s, dim=-1).T
    ct = torch.nn.functional.normalize(t, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    assert got.item() == pytest.approx(((cs - ct) ** 2).mean().item() * 6, rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"similarity": "dot"}, "relation similarity 'dot'"),
    ({"loss": "l1"}, "relation loss 'l1'"),
    ({"similarity": "cosine", "loss": "kl"}, "needs similarity 'softmax'"),
])
def test_relation_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hidden.relation(torch.randn(2, 3, 4), torch.randn(2, 3, 4), **kwargs)


def test_relation_rejects_different_leading_shapes():
    with pytest.raises(ValueError, match="differ before the feature dimension"):
        hidden.relation(torch.randn(2, 3, 4), torch.randn(2, 5, 4))


def test_relation_saves_no_full_relation_matrix_for_backward():
    """Blocks run under checkpointing: what autograd keeps between forward and backward is the inputs, never a
    (L, T, T) relation tensor (here L·T·T = 8192 entries vs blocks of 64)."""
    L, T, d = 2, 64, 4
    s = torch.randn(L, T, d, requires_grad=True)
    t = torch.randn(L, T, 8)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        total = hidden.relation(s, t, causal=True, chunk_elements=64)
    total.backward()
    assert max(sizes) <= L * T * 8 < L * T * T
    assert torch.isfinite(s.grad).all()
