"""The fused loss's compute dtype: matmuls in the hidden/head dtype (or the ambient autocast dtype), logits,
log-softmax and the weight-gradient accumulation in fp32, gradients returned in each parameter's own dtype; and
the chunk loop's bookkeeping (which chunks are skipped)."""
from __future__ import annotations

import pytest
import torch

from potstill.losses.chunked import fused_loss, labelled_chunks
from potstill.losses.objective import parse_objective
from potstill.losses.targets import TeacherHidden

OBJECTIVES = ["0.5*ce + fkl", "gjsd(beta=0.5)", "rkl"]


def _data(seed=0, n=48, h=32, v=50):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * h**-0.5
    bias = torch.randn(v, generator=g) * 0.1
    t_hidden, t_weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * h**-0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[0, 7, 30]] = -100
    return hidden, weight, bias, t_hidden, t_weight, labels


def _loss_and_grads(text, hidden, weight, bias, t_hidden, t_weight, labels, dtype, chunk_size=16):
    params = [x.detach().to(dtype).requires_grad_() for x in (hidden, weight, bias)]
    teacher = TeacherHidden(t_hidden.to(dtype), t_weight.to(dtype))
    out = fused_loss(*params, labels, parse_objective(text, temperature=2.0), teacher, chunk_size=chunk_size)
    out.total.backward()
    return out.total.detach(), [p.grad for p in params]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# bf16 rounding: inputs and logits carry 8 significant bits (relative 2^-9 ≈ 0.2% per value); the loss and the
# gradients are sums of many such values. Measured worst case over these objectives and seeds 0-2: loss 0.04%,
# gradients 0.58% (relative Frobenius norm); we state 0.5% and 1.5%.
BF16_LOSS_REL, BF16_GRAD_REL = 5e-3, 1.5e-2


@pytest.mark.parametrize("text", OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_values_and_gradients_close_to_fp32_with_param_dtypes(text, seed):
    data = _data(seed)
    ref_loss, ref_grads = _loss_and_grads(text, *data, torch.float32)
    loss, grads = _loss_and_grads(text, *data, torch.bfloat16)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref_loss), rel=BF16_LOSS_REL)
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
        assert _rel_err(grad, ref) <= BF16_GRAD_REL


@pytest.mark.parametrize("text", OBJECTIVES)
def test_autocast_gives_the_explicit_bf16_computation_with_fp32_grads(text):
    """Under autocast (fp32 master parameters, bf16 compute) the loop's matmuls run in the autocast dtype and
    nothing else changes: the loss and gradients are bit-identical to passing bf16 copies of the parameters
    outside autocast (whose gradients are the same fp32 accumulations, rounded to bf16), and each gradient comes
    back in its parameter's dtype (fp32)."""
    hidden, weight, bias, t_hidden, t_weight, labels = _data()
    params = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_loss(*params, labels, parse_objective(text, temperature=2.0),
                         TeacherHidden(t_hidden.bfloat16(), t_weight.bfloat16()), chunk_size=16)
    out.total.backward()
    grads = [p.grad for p in params]
    assert all(g.dtype == torch.float32 for g in grads)
    loss_bf16, grads_bf16 = _loss_and_grads(text, hidden, weight, bias, t_hidden, t_weight, labels, torch.bfloat16)
    assert out.total.item() == loss_bf16.item()
    assert torch.equal(grads[0].bfloat16(), grads_bf16[0])  # dL/dh: the bf16 GEMM's output
    assert torch.equal(grads[1].bfloat16(), grads_bf16[1])  # dL/dW: fp32 accumulation, rounded once
    assert torch.equal(grads[2].bfloat16(), grads_bf16[2])


def test_labelled_chunks_marks_chunks_with_a_nonzero_weight():
    weights = torch.tensor([0.0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0])
    assert labelled_chunks(weights, 3) == [False, True, False, True]
    assert labelled_chunks(weights, 11) == [True] and labelled_chunks(torch.zeros(0), 4) == []


def test_padding_only_chunks_change_nothing():
    """A batch padded with unlabelled positions (whole chunks of them) gives the same loss and gradients for
    the labelled positions as the batch without the padding."""
    hidden, weight, bias, t_hidden, t_weight, labels = _data()
    pad = 40
    padded = [torch.cat([x, torch.randn(pad, x.shape[1])]) for x in (hidden, t_hidden)]
    padded_labels = torch.cat([labels, torch.full((pad,), -100)])
    loss, grads = _loss_and_grads("0.5*ce + fkl", padded[0], weight, bias, padded[1], t_weight, padded_labels,
                                  torch.float32)
    ref_loss, ref_grads = _loss_and_grads("0.5*ce + fkl", hidden, weight, bias, t_hidden, t_weight, labels,
                                          torch.float32)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    torch.testing.assert_close(grads[0][: len(labels)], ref_grads[0], rtol=1e-5, atol=0)
    assert not grads[0][len(labels):].any()
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-5, atol=1e-7)
