"""xproj: the teacher's distribution projected onto the student's vocabulary at aligned positions (per whitespace
prefix), against a naive reference from the definition, exact numbers, the maps and prefixes of real tokenizers."""
from __future__ import annotations

import math

import pytest
import torch

from potstill.builtin.sources import builtin_texts
from potstill.crosstok.batches import Aligner
from potstill.crosstok.projection import PREFIXES, prefix_index, projection_maps
from potstill.losses.aligned import AlignedTeacher
from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits
from potstill.models import load_tokenizer, resolve_model_path
from tests.crosstok_reference import ce_and_aligned_rows
from tests.crosstok_tokenizers import explicit_bpe
from tests.test_losses import _gjsd_ref


def _synthetic(vs, vt, seed=0, n=13):
    """Random student/teacher rows, two prefix maps with collisions and unmapped teacher ids, mixed masks."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, 5, generator=g), torch.randn(vs, 5, generator=g)
    teacher = 2 * torch.randn(n, vt, generator=g)
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[[2, 7]] = -100
    maps = torch.randint(0, vs, (2, vt), generator=g)
    maps[0, :2] = -1  # teacher ids that map nowhere (special tokens)
    maps[1, -1] = -1
    aligned = torch.rand(n, generator=g) < 0.8
    prefix = torch.randint(-1, 2, (n,), generator=g)  # -1: whitespace without a map
    chunk = torch.full((n,), -1)
    target = AlignedTeacher(DenseLogits(teacher), aligned, torch.zeros(n, dtype=torch.bool), chunk, torch.zeros(0),
                            torch.full((vt,), -1), prefix, maps)
    return hidden, weight, labels, target


def _projected_ref(p, row, vs):
    """The projected target from the definition: student bin s gets Σ p[t] over teacher ids t with row[t] = s,
    renormalised over the mapped mass."""
    bins = [sum((p[t] for t in range(len(row)) if int(row[t]) == s), p.new_zeros(())) for s in range(vs)]
    bins = torch.stack(bins)
    return bins / bins.sum()


def _naive(hidden, weight, labels, target, temperature, beta, ce=0.3):
    total, rows = ce_and_aligned_rows(hidden, weight, labels, target, temperature, ce)
    for i, q, p in rows:
        k = int(target.prefix[i])
        if k < 0:
            continue
        row = target.projection[k]
        proj = _projected_ref(p, row, q.shape[0])
        reached = sorted({int(x) for x in row if x >= 0})  # the student ids that can start a chunk after this prefix
        q_given = q[reached] / q[reached].sum()  # the student's distribution given a new chunk starts
        proj = proj[reached]
        if beta == 0:  # fkl: bins the projection leaves empty add 0·log 0 = 0
            keep = proj > 0
            value = _gjsd_ref(q_given[keep], proj[keep], beta)
        else:  # a 1e-30 floor in place of 0 changes the value by < 1e-28
            value = _gjsd_ref(q_given, proj.clamp_min(1e-30), beta)
        total = total + temperature**2 * value
    return total


@pytest.mark.parametrize("vs,vt", [(7, 11), (12, 5)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_xproj_matches_the_naive_reference_in_value_and_gradient(vs, vt, temperature, beta):
    hidden, weight, labels, target = _synthetic(vs, vt)
    objective = parse_objective(f"0.3*ce + xproj(beta={beta})", temperature)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_loss(h, w, None, labels, objective, target, chunk_size=3)
    out.total.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _naive(h2, w2, labels, target, temperature, beta)
    ref.backward()
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


def _one_position(q, p, prefix, maps):
    logq = torch.tensor([q]).log()
    target = AlignedTeacher(DenseLogits(torch.tensor([p]).log()), torch.tensor([True]), torch.tensor([False]),
                            torch.tensor([-1]), torch.zeros(0), torch.full((len(p),), -1), torch.tensor([prefix]),
                            maps)
    return logq, torch.eye(len(q)), target


def test_exact_numbers_on_a_tiny_case():
    # teacher p = (.4, .3, .2, .1) over 4 ids, student q = (.5, .3, .2) over 3. Prefix 1 maps teacher (0, 1, 2, 3) →
    # student (0, 1, 1, none): mass (.4, .5, 0), renormalised over .9 → (4/9, 5/9). It reaches student ids {0, 1}
    # only, so the student is compared given a chunk starts: q over {0, 1} renormalised = (.625, .375); fkl.
    maps = torch.tensor([[1, 0, 0, 2], [0, 1, 1, -1]])
    h, w, target = _one_position([0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1], 1, maps)
    got = fused_loss(h, w, None, torch.tensor([0]), parse_objective("xproj"), target).total.item()
    assert got == pytest.approx(4 / 9 * math.log((4 / 9) / 0.625) + 5 / 9 * math.log((5 / 9) / 0.375), rel=1e-5)
    # prefix 0 picks the other map, which reaches every student id: target (.5, .4, .1), q as it is
    h, w, target = _one_position([0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1], 0, maps)
    got = fused_loss(h, w, None, torch.tensor([0]), parse_objective("xproj"), target).total.item()
    assert got == pytest.approx(0.4 * math.log(0.4 / 0.3) + 0.1 * math.log(0.1 / 0.2), rel=1e-5)
    # no map for the position's whitespace (prefix -1): it adds nothing
    h, w, target = _one_position([0.5, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1], -1, maps)
    assert fused_loss(h, w, None, torch.tensor([0]), parse_objective("xproj"), target).total.item() == 0.0


def test_xproj_without_projection_maps_is_refused_in_one_line():
    h, w, target = _one_position([0.5, 0.5], [0.5, 0.5], 0, torch.tensor([[0, 1]]))
    target.projection = None
    with pytest.raises(ValueError, match="xproj needs the teacher projected onto the student's vocabulary"):
        fused_loss(h, w, None, torch.tensor([0]), parse_objective("xproj"), target)


# ---- the maps and prefixes of real tokenizers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_level():
    return load_tokenizer(resolve_model_path("builtin"))


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("builtin:bpe")


def test_prefix_index_names_the_whitespace_before_the_teacher_token():
    text = "a cat\nsat  on".encode()
    assert [prefix_index(text, b, t) for b, t in [(0, 0), (1, 2), (5, 6), (9, 11), (4, 4)]] == [0, 1, 2, -1, 0]
    assert PREFIXES[:2] == ("", " ")


def test_word_level_teacher_maps_onto_the_bpe_students_space_tokens(word_level, bpe):
    """'cat' after a space is the student's 'Ġcat'; 'the' at the start of the text its 'the'; specials map nowhere,
    EOS to EOS; a word the student splits goes to its first piece."""
    maps = projection_maps(word_level, bpe, len(word_level), len(bpe))
    t, s = word_level.convert_tokens_to_ids, bpe.convert_tokens_to_ids
    assert maps.shape == (len(PREFIXES), len(word_level))
    assert int(maps[PREFIXES.index(" "), t("cat")]) == s("Ġcat")
    assert int(maps[PREFIXES.index(""), t("the")]) == s("the")
    for special in (word_level.pad_token_id, word_level.bos_token_id, word_level.unk_token_id):
        assert (maps[:, special] == -1).all()
    assert (maps[:, word_level.eos_token_id] == bpe.eos_token_id).all()
    split = next(w for w in ("lazy", "quietly", "elephant", "yesterday") if len(bpe(" " + w)["input_ids"]) > 2)
    assert int(maps[1, t(split)]) == bpe(" " + split, add_special_tokens=False)["input_ids"][0]


def test_aligner_gives_each_aligned_position_its_prefix(word_level, bpe):
    """'the cat': teacher '<s> the cat', student '<s> the Ġcat': 'the' follows nothing (""), 'cat' a space (" "),
    the EOS chunk "" ."""
    ids = bpe("the cat")["input_ids"] + [bpe.eos_token_id]
    out = Aligner(word_level, bpe)({"text": "the cat"}, ids, list(ids), "test")
    assert bpe.convert_ids_to_tokens(ids) == ["<s>", "the", "Ġcat", "</s>"]
    assert out["xtok_positions"] == [0, 1, 2]
    assert out["xtok_prefix"] == [0, 1, 0]


def test_a_byte_level_teacher_has_no_prefix(tmp_path, bpe):
    merges = [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t")]
    teacher = explicit_bpe(tmp_path / "t", merges, bos=True)
    ids = bpe("the cat")["input_ids"] + [bpe.eos_token_id]
    out = Aligner(teacher, bpe)({"text": "the cat"}, ids, list(ids), "test")
    assert out["xtok_prefix"] == [0, 0, 0]


def test_projection_sends_each_observed_teacher_token_to_the_students_on_builtin_text(word_level, bpe):
    """Where the projection is exact: at every aligned position whose chunk is ONE non-special teacher token, the
    map sends the teacher's observed token to the student's observed first token of the chunk (the student's
    byte-level pre-tokeniser splits at spaces, so its encoding of prefix + word starts as in context)."""
    maps = projection_maps(word_level, bpe, len(word_level), len(bpe))
    aligner, special = Aligner(word_level, bpe), set(word_level.all_special_ids) - {word_level.eos_token_id}
    checked = 0
    for text in builtin_texts("validation", 20):
        ids = bpe(text)["input_ids"] + [bpe.eos_token_id]
        pairs, teacher_ids = aligner.chunks(text, ids, "test")
        for pair in pairs:
            t = teacher_ids[pair.teacher[0]]
            if len(pair.teacher) == 1 and t not in special and pair.prefix >= 0:
                assert int(maps[pair.prefix, t]) == ids[pair.student[0]], (text, pair)
                checked += 1
    assert checked > 500
