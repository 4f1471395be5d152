"""Every registered divergence × every teacher-target kind × temperature: finite value AND finite gradient, and
equal to a naive reference written from the definition where one exists.

Top-k targets are evaluated on k + 1 bins (the k stored ids and one tail bin, for teacher and student alike), so
the reference collapses both full distributions to those bins by hand and applies the divergence's naive formula
(tests/test_losses.py::REFERENCES) to them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from potstill.cache.targets import topk_padding
from potstill.losses.chunked import fused_loss
from potstill.losses.divergences import DIVERGENCES
from potstill.losses.objective import parse_objective
from potstill.losses.targets import TAIL_FLOOR, DenseLogits, Sampled, TokenLogprobs, TopKTail
from tests.test_losses import REFERENCES

V, K = 17, 5
TEMPERATURES = [1.0, 2.0]
TEACHER_TERMS = [n for n in DIVERGENCES.names() if not DIVERGENCES.get(n).uses_labels]
TOKEN_TERMS = [n for n in TEACHER_TERMS if DIVERGENCES.get(n).token is not None]  # opd: the label token only
CROSSTOK_TERMS = [n for n in TEACHER_TERMS if DIVERGENCES.get(n).crosstok]  # uld, gold, alm: dense signals only
BIN_TERMS = [n for n in TEACHER_TERMS if n not in TOKEN_TERMS + CROSSTOK_TERMS]  # served by top-k targets


def _objective(name, temperature):
    hp = REFERENCES[name][0]
    return parse_objective(f"{name}({','.join(f'{k}={v}' for k, v in hp.items())})" if hp else name, temperature)


def _data(n=23, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(V, h, generator=g)
    teacher = 2 * torch.randn(n, V, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[[0, 5, 6]] = -100
    return hidden, weight, teacher, labels


def _topk_zero_tail(teacher, t):
    """A top-k target whose stored tail is exactly 0 (what fp16 rounding gives when the top k hold ~all mass)."""
    target = TopKTail.from_logits(teacher, K, t)
    return TopKTail(target.ids, target.logprobs, torch.zeros_like(target.tail_mass), V, t)


def _topk_padded(teacher, t):
    """Every row filled the way cache/targets.py pads positions past an example's end."""
    ids, logprob, tail = topk_padding(K)
    n = teacher.shape[0]
    return TopKTail(ids.expand(n, K).clone(), torch.full((n, K), logprob), torch.full((n,), tail), V, t)


def _topk_beyond_vocab(teacher, t):
    """A teacher with 4 padded vocabulary rows that carry much of the top-k mass: ids ≥ V must become empty slots."""
    padded = torch.cat([teacher, teacher[:, :4] + 3.0], dim=1)
    target = TopKTail.from_logits(padded, K, t)
    assert bool((target.ids >= V).any())
    return target


def _dense_with_neg_inf(teacher, t):
    masked = teacher.clone()
    masked[:, [2, 9]] = float("-inf")
    masked[1, :12] = float("-inf")
    return DenseLogits(masked)


def _label_token(teacher, t, labels):
    """The teacher's log-prob of each label at T = t, 0 on unlabelled rows (a server teacher's signal)."""
    logp = F.log_softmax(teacher / t, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    return TokenLogprobs(torch.where(labels != -100, logp, 0.0), t)


KINDS = {
    "dense": lambda teacher, t: DenseLogits(teacher),
    "dense_neg_inf": _dense_with_neg_inf,
    "topk": lambda teacher, t: TopKTail.from_logits(teacher, K, t),
    "topk_zero_tail": _topk_zero_tail,
    "topk_padded_rows": _topk_padded,
    "topk_ids_beyond_vocab": _topk_beyond_vocab,
}


TOKEN_KINDS = ["dense", "dense_neg_inf", "token"]  # the kinds that carry the teacher's log-prob of every label


def _accepted():
    """(term, kind) pairs a term is served on: bin terms on every dense and top-k kind, token terms on the kinds
    that give the label's log-prob (the token kind is built from the labels, see _target)."""
    return ([(n, k) for n in BIN_TERMS for k in KINDS] + [(n, k) for n in TOKEN_TERMS for k in TOKEN_KINDS]
            + [(n, k) for n in CROSSTOK_TERMS for k in ("dense", "dense_neg_inf")])


@pytest.mark.parametrize("name", CROSSTOK_TERMS)
@pytest.mark.parametrize("kind", ["topk", "token", "sampled"])
def test_crosstok_terms_refuse_signals_without_the_full_distribution(name, kind):
    hidden, weight, teacher, labels = _data()
    ids = torch.zeros(teacher.shape[0], 2, dtype=torch.long)
    target = Sampled(ids, torch.ones(ids.shape), 1.0) if kind == "sampled" else _target(kind, teacher, 1.0, labels)
    with pytest.raises(ValueError, match=f"{name} need the teacher's full distribution"):
        fused_loss(hidden, weight, None, labels, _objective(name, 1.0), target)


def _target(kind, teacher, t, labels):
    return _label_token(teacher, t, labels) if kind == "token" else KINDS[kind](teacher, t)


def _run(name, target, temperature, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_loss(h, w, None, labels, _objective(name, temperature), target, chunk_size=6)
    out.total.backward()
    return out.total, h.grad, w.grad


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,kind", _accepted())
def test_value_and_gradient_finite(name, kind, temperature):
    hidden, weight, teacher, labels = _data()
    total, gh, gw = _run(name, _target(kind, teacher, temperature, labels), temperature, hidden, weight, labels)
    assert torch.isfinite(total)
    if name not in TOKEN_TERMS:  # a sampled-token value is a one-sample estimate of KL(q‖p): it may be negative
        assert total.item() >= -1e-6
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert gh.abs().sum() > 0  # a gradient that is all zeros would hide a broken path as well as a NaN


@pytest.mark.parametrize("name", TOKEN_TERMS)
def test_token_terms_on_dense_and_token_targets_agree_and_are_refused_without_label_logprobs(name):
    """The label's log-prob gathered from the dense teacher equals the one a token target carries (value and
    gradient); top-k and sampled targets lack it and are refused with one line."""
    hidden, weight, teacher, labels = _data()
    dense = _run(name, DenseLogits(teacher), 2.0, hidden, weight, labels)
    token = _run(name, _label_token(teacher, 2.0, labels), 2.0, hidden, weight, labels)
    for a, b in zip(dense, token):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    ids = torch.zeros(teacher.shape[0], 2, dtype=torch.long)
    for target in (TopKTail.from_logits(teacher, K, 2.0), Sampled(ids, torch.ones(ids.shape), 2.0)):
        with pytest.raises(ValueError, match=f"lacks the teacher's log-prob of each label token, which {name} needs"):
            fused_loss(hidden, weight, None, labels, _objective(name, 2.0), target)


@pytest.mark.parametrize("name", BIN_TERMS)
def test_a_token_target_refuses_terms_that_need_the_distribution(name):
    hidden, weight, teacher, labels = _data()
    with pytest.raises(ValueError, match=f"{name} need the teacher's distribution"):
        fused_loss(hidden, weight, None, labels, _objective(name, 1.0), _label_token(teacher, 1.0, labels))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_sampled_target_finite_for_fkl_and_refused_for_the_rest(temperature):
    hidden, weight, teacher, labels = _data()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (teacher.shape[0], 6), generator=g)
    weights = torch.full(ids.shape, 1 / 6)
    weights[:, -1] = 0.0  # a padding slot
    total, gh, gw = _run("fkl", Sampled(ids, weights, temperature), temperature, hidden, weight, labels)
    assert torch.isfinite(total) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    for name in BIN_TERMS:
        if name != "fkl":
            with pytest.raises(ValueError, match=f"{name} need the full teacher distribution"):
                fused_loss(hidden, weight, None, labels, _objective(name, temperature), Sampled(ids, weights, temperature))


def _binned_reference(name, hidden, weight, labels, target, temperature):
    """Naive k + 1-bin formula: q_bins = (q(ids), 1 − Σ q(ids)), p_bins = (p(ids), max(tail, TAIL_FLOOR)) / Σ."""
    q = F.softmax(hidden @ weight.T / temperature, -1)
    q_top = q.gather(-1, target.ids)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_bins = torch.cat([target.logprobs.exp(), target.tail_mass.clamp_min(TAIL_FLOOR)[:, None]], -1)
    p_bins = p_bins / p_bins.sum(-1, keepdim=True)
    per = REFERENCES[name][1](q_bins, p_bins, **REFERENCES[name][0])
    return (per * temperature**2)[labels != -100].sum()


def _top_and_label_reference(hidden, weight, labels, target, temperature):
    """fkl on top-k: −Σ_top p·log q − [y ∉ top]·log q(y), p the renormalised bins (see TopKChunk.with_label)."""
    logq = F.log_softmax(hidden @ weight.T / temperature, -1)
    p_bins = torch.cat([target.logprobs.exp(), target.tail_mass.clamp_min(TAIL_FLOOR)[:, None]], -1)
    p_top = (p_bins / p_bins.sum(-1, keepdim=True))[:, :-1]
    rows = []
    for i, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        value = -(p_top[i] * logq[i, target.ids[i]]).sum()
        rows.append(value if y in target.ids[i].tolist() else value - logq[i, y])
    return torch.stack(rows).sum() * temperature**2


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", ["topk", "topk_zero_tail"])
@pytest.mark.parametrize("name", BIN_TERMS)
def test_topk_equals_naive_reference(name, kind, temperature):
    """Terms with a sparse form (fkl) use top-k + label; all others the k + 1 bins."""
    hidden, weight, teacher, labels = _data()
    target = KINDS[kind](teacher, temperature)
    total, gh, gw = _run(name, target, temperature, hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if DIVERGENCES.get(name).sparse is not None:
        ref = _top_and_label_reference(h, w, labels, target, temperature)
    else:
        ref = _binned_reference(name, h, w, labels, target, temperature)
    ref.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", BIN_TERMS)
def test_topk_with_k_equal_v_equals_dense_value_and_gradient(name, temperature):
    """k = V: the k + 1-bin form is the dense objective; fkl's top-k + label form is H(p, q) = KL + H(p)."""
    hidden, weight, teacher, labels = _data()
    dense = _run(name, DenseLogits(teacher), temperature, hidden, weight, labels)
    topk = _run(name, TopKTail.from_logits(teacher, V, temperature), temperature, hidden, weight, labels)
    logp = F.log_softmax(teacher / temperature, -1)
    entropy = -(logp.exp() * logp).sum(-1)[labels != -100].sum().item() * temperature**2
    offset = entropy if DIVERGENCES.get(name).sparse is not None else 0.0
    assert topk[0].item() == pytest.approx(dense[0].item() + offset, rel=1e-5)
    for a, b in zip(topk[1:], dense[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_topk_tail_bin_is_the_rest_of_the_mass():
    """Known values: p = softmax(log(4, 3, 2, 1)) = (.4, .3, .2, .1), top 2 → bins (.4, .3, .3)."""
    logits = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    chunk = TopKTail.from_logits(logits, 2).chunk_bins(slice(0, 1), 4)
    torch.testing.assert_close(chunk.teacher_logp.exp(), torch.tensor([[0.4, 0.3, 0.3]]))
    student = chunk.student(F.log_softmax(torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), -1)).exp()
    torch.testing.assert_close(student, torch.tensor([[0.1, 0.2, 0.7]]))


def test_zero_tail_is_floored_not_minus_infinity():
    logits = torch.tensor([[30.0, 0.0, -1.0]])
    target = TopKTail(torch.tensor([[0, 1]]), F.log_softmax(logits, -1)[:, :2], torch.zeros(1), 3)
    tail = target.chunk_bins(slice(0, 1), 3).teacher_logp[0, -1].item()
    assert tail == pytest.approx(math.log(TAIL_FLOOR), rel=1e-3)


def test_topk_fkl_with_labels_from_the_teacher_is_unbiased():
    """If the labels are draws from the teacher, the top-k + label gradient averages to the dense fkl gradient
    (Monte Carlo over label draws; the error shrinks like 1/sqrt(draws)). Evenly spreading the tail, or the
    k + 1 bins alone, stay biased whatever the number of draws."""
    hidden, weight, teacher, _ = _data(n=12)
    target = TopKTail.from_logits(teacher, 3)
    all_labelled = torch.zeros(12, dtype=torch.long)
    _, dense_grad, _ = _run("fkl", DenseLogits(teacher), 1.0, hidden, weight, all_labelled)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(F.softmax(teacher, -1), 1024, replacement=True, generator=g)  # (12, 1024)
    grads = torch.stack([_run("fkl", target, 1.0, hidden, weight, draws[:, i])[1] for i in range(1024)])
    error = lambda n: ((grads[:n].mean(0) - dense_grad).norm() / dense_grad.norm()).item()  # noqa: E731
    assert error(1024) < 0.05 and error(1024) < error(16) / 4, (error(16), error(1024))
