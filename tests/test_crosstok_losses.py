"""Cross-tokenizer KD: uld, gold and alm through the fused chunked path against naive references written from the
definitions (loops over positions and chunks), in value and gradient; exact numbers on tiny cases; the encode-time
alignment lists on hand-derivable tokenisations (BOS on one side only, a multi-byte character split differently);
the guardrail; an end-to-end run of the built-in teacher into a byte-level BPE student."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from potstill.config import RunConfig
from potstill.crosstok.batches import Aligner, ChunkPair, example_alignment
from potstill.crosstok.targets import build_aligned, vocab_map
from potstill.data.batches import collate
from potstill.data.encode import Example
from potstill.guardrails import TokenizerMismatch
from potstill.losses.aligned import AlignedTeacher
from potstill.losses.chunked import fused_loss
from potstill.losses.objective import parse_objective
from potstill.losses.targets import DenseLogits
from potstill.models import load_tokenizer, resolve_model_path
from tests.crosstok_tokenizers import explicit_bpe, trained_bpe
from tests.crosstok_reference import ce_and_aligned_rows
from tests.test_losses import _alm_ref, _gjsd_ref, _uld_ref

VS, VT = 7, 11
# teacher id → student id; teacher ids 2 and 5 share student id 1; teacher 8, 9, 10 unmapped; student 6 unmapped
MAP = torch.tensor([0, 3, 1, 2, 4, 1, 5, -1, -1, -1, -1] [:VT])
CHUNK = [0, 0, 1, -1, 2, 2, 2, 3, -1, 4, 4, 5, 5, 5]  # chunks run across the loss' own chunks of 3 positions


def _synthetic(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(CHUNK)
    hidden, weight = torch.randn(n, 5, generator=g), torch.randn(VS, 5, generator=g)
    teacher = 2 * torch.randn(n, VT, generator=g)
    labels = torch.randint(0, VS, (n,), generator=g)
    chunk = torch.tensor(CHUNK)
    labels[[3, 8]] = -100  # outside any chunk (a prompt token)
    aligned = torch.rand(n, generator=g) < 0.7
    exact = aligned & (torch.rand(n, generator=g) < 0.5)
    chunk_teacher = -3 * torch.rand(int(chunk.max()) + 1, generator=g)
    target = AlignedTeacher(DenseLogits(teacher), aligned, exact, chunk, chunk_teacher, MAP)
    return hidden, weight, labels, target


def _bins(q, p):
    """GOLD's exact-match distributions written out: student ids some teacher id maps to, plus one 'other' bin."""
    mapped = sorted({int(s) for s in MAP if s >= 0})
    qb = [q[s] for s in mapped] + [sum(q[s] for s in range(VS) if s not in mapped)]
    pb = [sum(p[t] for t in range(VT) if int(MAP[t]) == s) for s in mapped]
    pb.append(sum(p[t] for t in range(VT) if MAP[t] < 0))
    return torch.stack(qb), torch.stack(pb)


def _naive(hidden, weight, labels, target: AlignedTeacher, temperature, ce=0.3, beta=0.3, mw=0.7, uw=1.5, tau=3.0):
    """0.3*ce + uld + gold(...) + alm(...) from the definitions, position by position and chunk by chunk."""
    z = hidden @ weight.T
    total, rows = ce_and_aligned_rows(hidden, weight, labels, target, temperature, ce)
    for i, q, p in rows:
        uld = _uld_ref(q, p)
        gold = mw * _gjsd_ref(*_bins(q, p), beta) if target.exact[i] else uw * uld
        total = total + temperature**2 * (uld + gold)
    for c in range(target.chunk_teacher_logp.shape[0]):
        members = [i for i, k in enumerate(CHUNK) if k == c and labels[i] != -100]
        s = sum(F.log_softmax(z[i], -1)[labels[i]] for i in members)
        total = total + _alm_ref(s, target.chunk_teacher_logp[c], tau)
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_gold_alm_match_the_naive_reference_in_value_and_gradient(temperature):
    hidden, weight, labels, target = _synthetic()
    objective = parse_objective("0.3*ce + uld + gold(beta=0.3,matched_weight=0.7,unmatched_weight=1.5) + alm(tau=3)",
                                temperature)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_loss(h, w, None, labels, objective, target, chunk_size=3)
    out.total.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = _naive(h2, w2, labels, target, temperature)
    ref.backward()
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_alm_loss_is_the_same_whatever_the_chunk_size():
    hidden, weight, labels, target = _synthetic(1)
    results = []
    for size in (1, 4, 14):
        h = hidden.clone().requires_grad_()
        out = fused_loss(h, weight, None, labels, parse_objective("alm(tau=2)"), target, chunk_size=size)
        out.total.backward()
        results.append((out.total.detach(), h.grad))
    for total, grad in results[1:]:
        torch.testing.assert_close(total, results[0][0], rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)


def _one_position(q, p, exact=False, mapping=None, chunk_teacher=None):
    """hidden = log q with an identity head, so the student's distribution is exactly q; one labelled position."""
    logq = torch.tensor([q]).log()
    target = AlignedTeacher(DenseLogits(torch.tensor([p]).log()), torch.tensor([True]), torch.tensor([exact]),
                            torch.tensor([0 if chunk_teacher is not None else -1]),
                            torch.tensor([chunk_teacher if chunk_teacher is not None else 0.0]),
                            mapping if mapping is not None else torch.full((len(p),), -1))
    return logq, torch.eye(len(q)), target


def test_exact_numbers_on_tiny_cases():
    # ULD: sorted q (.5, .3, .2, 0) vs sorted p (.6, .2, .1, .1): |−.1| + |.1| + |.1| + |−.1| = 0.4
    h, w, target = _one_position([0.5, 0.3, 0.2], [0.6, 0.1, 0.2, 0.1])
    assert fused_loss(h, w, None, torch.tensor([0]), parse_objective("uld"), target).total.item() == pytest.approx(0.4, rel=1e-5)
    # gold(beta=0) = fkl on the mapped bins: teacher (a, b, c) → student (a, b, ·); p = (.5, .3, .2), q = (.4, .4, .2):
    # bins p (.5, .3 | other .2), q (.4, .4 | other .2): .5·ln(.5/.4) + .3·ln(.3/.4) + .2·ln 1
    h, w, target = _one_position([0.4, 0.4, 0.2], [0.5, 0.3, 0.2], exact=True, mapping=torch.tensor([0, 1, -1]))
    got = fused_loss(h, w, None, torch.tensor([0]), parse_objective("gold(beta=0)"), target).total.item()
    assert got == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4), rel=1e-5)
    # alm(tau=1): student chunk likelihood q(y) = .5, teacher's .25 → KL(Bern(.25·e^−ε) ‖ Bern(.5·e^−ε))
    h, w, target = _one_position([0.5, 0.5], [0.5, 0.5], chunk_teacher=math.log(0.25))
    a, b = 0.25 * math.exp(-1e-6), 0.5 * math.exp(-1e-6)
    expected = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    got = fused_loss(h, w, None, torch.tensor([0]), parse_objective("alm(tau=1)"), target).total.item()
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gold_drops_an_empty_other_bin_and_stays_finite(beta):
    """Every student id mapped (q has no 'other' mass) while the teacher has an unmapped id, and the reverse:
    the 'other' bin is dropped on both sides and each side renormalised over the mapped bins, so fkl (β = 0) and
    rkl (β = 1) stay finite in value and gradient. Student ids (a, b) ← teacher (a, b, c·unmapped):
    p over the bins = (.5, .3)/.8, q = (.4, .6)."""
    cases = [([0.4, 0.6], [0.5, 0.3, 0.2], torch.tensor([0, 1, -1])),     # every student id is hit
             ([0.4, 0.5, 0.1], [0.5, 0.5], torch.tensor([0, 1]))]        # every teacher id is mapped
    for q, p, mapping in cases:
        h, w, target = _one_position(q, p, exact=True, mapping=mapping)
        h.requires_grad_(True)
        out = fused_loss(h, w, None, torch.tensor([0]), parse_objective(f"gold(beta={beta})"), target)
        (grad,) = torch.autograd.grad(out.total, h)
        qb = torch.tensor(q[:2]) / sum(q[:2])
        pb = torch.tensor([p[0], p[1]]) / (p[0] + p[1])
        first, second = (pb, qb) if beta == 0.0 else (qb, pb)
        expected = float((first * (first / second).log()).sum())
        assert math.isfinite(out.total.item()) and torch.isfinite(grad).all()
        assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_same_vocabulary_terms_are_refused_on_an_aligned_teacher():
    hidden, weight, labels, target = _synthetic()
    with pytest.raises(ValueError, match="fkl .* cannot be computed: use the cross-tokenizer terms uld, gold, xproj or alm"):
        fused_loss(hidden, weight, None, labels, parse_objective("fkl + uld"), target)


# ---- encode-time alignment on hand-derivable tokenisations ----------------------------------------------------


@pytest.fixture(scope="module")
def word_level():
    return load_tokenizer(resolve_model_path("builtin"))  # adds BOS


@pytest.fixture(scope="module")
def bpe_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    no_bos = explicit_bpe(root / "no_bos", [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t")])
    split_e = explicit_bpe(root / "split", [("Ġ", "c"), ("Ġc", "a"), ("Ġca", "f")], bos=True)
    whole_e = explicit_bpe(root / "whole", [("Ã", "©"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "f"), ("Ġcaf", "Ã©")], bos=True)
    return no_bos, split_e, whole_e


def _lists(teacher, student, text):
    ids = student(text)["input_ids"] + [student.eos_token_id]
    return ids, Aligner(teacher, student)({"text": text}, ids, list(ids), "test")


def test_bos_on_the_teacher_only(word_level, bpe_pair):
    """Teacher <s> the cats </s>, student the Ġcat s </s>: 'the' has no predicting student position (no BOS), so only
    the chunk 'Ġcat s' ↔ 'cats' (2 student tokens: not exact) and the EOS chunk are aligned."""
    ids, out = _lists(word_level, bpe_pair[0], "the cats")
    assert bpe_pair[0].convert_ids_to_tokens(ids[:3]) == ["the", "Ġcat", "s"]
    assert out["xtok_teacher_ids"] == [1, word_level.convert_tokens_to_ids("the"), word_level.convert_tokens_to_ids("cats"), 2]
    assert out["xtok_positions"] == [1, -1, 2]
    assert out["xtok_exact"] == [0, 0, 1]
    assert out["xtok_chunk"] == [0, 0, 1]
    assert out["xtok_teacher_chunk"] == [-1, 0, 1]


def test_bos_on_the_student_only(word_level, bpe_pair):
    _, out = _lists(bpe_pair[0], word_level, "the cats")
    assert out["xtok_positions"] == [-1, 0, 2]
    assert out["xtok_chunk"] == [-1, 0, 1]
    assert out["xtok_teacher_chunk"] == [0, 0, 1]


def test_a_multibyte_character_split_differently(bpe_pair):
    """'é' (2 bytes) is two byte tokens for the student (Ã ©), part of 'Ġcafé' for the teacher: one chunk
    'Ġcaf Ã ©' ↔ 'Ġcafé', aligned at its first token only; u, n and EOS are exact one-token chunks."""
    _, split_e, whole_e = bpe_pair
    ids, out = _lists(whole_e, split_e, "un café")
    assert split_e.convert_ids_to_tokens(ids) == ["<s>", "u", "n", "Ġcaf", "Ã", "©", "</s>"]
    assert whole_e.convert_ids_to_tokens(out["xtok_teacher_ids"]) == ["<s>", "u", "n", "ĠcafÃ©", "</s>"]
    assert out["xtok_positions"] == [0, 1, 2, -1, -1, 3]
    assert out["xtok_exact"] == [1, 1, 0, 0, 0, 1]
    assert out["xtok_chunk"] == [0, 1, 2, 2, 2, 3]
    assert out["xtok_teacher_chunk"] == [0, 1, 2, 3]


def test_built_target_gathers_the_teacher_and_sums_its_chunks(bpe_pair):
    """build_aligned on the 'un café' batch: rows are the teacher's at the aligned positions, exact needs the vocab
    map to send the teacher's next token to the student's, chunk likelihoods are the teacher's label sums."""
    _, split_e, whole_e = bpe_pair
    ids, out = _lists(whole_e, split_e, "un café")
    batch = collate([Example(0, ids, list(ids), extra=out)], split_e.pad_token_id)
    t_ids = batch["xtok_teacher_ids"]
    logits = torch.randn(1, t_ids.shape[1], len(whole_e))
    label_logp = F.log_softmax(logits[:, :-1], -1).gather(-1, t_ids[:, 1:, None]).squeeze(-1)
    rows = logits[0, batch["xtok_positions"][0].clamp_min(0)]
    mapping = vocab_map(whole_e, split_e, len(whole_e), len(split_e))
    target = build_aligned(DenseLogits(rows), label_logp, batch, mapping)
    assert target.aligned.tolist() == [True, True, True, False, False, True]
    assert target.exact.tolist() == [True, True, False, False, False, True]
    assert target.chunk.tolist() == [0, 1, 2, 2, 2, 3]
    torch.testing.assert_close(target.chunk_teacher_logp[:4], label_logp[0], rtol=1e-6, atol=0)
    assert int(mapping[whole_e.convert_tokens_to_ids("u")]) == split_e.convert_tokens_to_ids("u")
    assert int(mapping[whole_e.convert_tokens_to_ids("ĠcafÃ©")]) == -1


# ---- the loop ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_tokenizer_dir(tmp_path_factory):
    from potstill.builtin import builtin_texts

    path = tmp_path_factory.mktemp("student_tok") / "bpe"
    trained_bpe(path, builtin_texts("train", 300), 600)
    return path


def _cfg(tmp_path, tok_dir, objective, **extra):
    data = {"teacher": {"path": "builtin"},
            "student": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 256},
                        "tokenizer": str(tok_dir)},
            "data": {"train": "builtin", "max_length": 64, "max_train_examples": 32, "max_eval_examples": 8},
            "loss": {"objective": objective},
            "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "save_every": 0, "lr": 1e-3, "log_every": 1,
                      "report_to": "none"},
            "eval": {"max_new_tokens": 4},
            "out_dir": str(tmp_path / "run")}
    for key, value in extra.items():
        section, name = key.split("__")
        data[section][name] = value
    return RunConfig.from_dict(data)


def test_different_tokenizers_without_a_crosstok_term_name_the_way_out(tmp_path, student_tokenizer_dir):
    from potstill.assemble import load_parts

    with pytest.raises(TokenizerMismatch, match=r"loss\.objective=uld, alm, gold or xproj.*docs/cross-tokenizer\.md"):
        load_parts(_cfg(tmp_path, student_tokenizer_dir, "fkl"), torch.device("cpu"))
    with pytest.raises(ValueError, match="fkl .* cannot be computed: keep only cross-tokenizer terms"):
        load_parts(_cfg(tmp_path, student_tokenizer_dir, "fkl + uld"), torch.device("cpu"))
    with pytest.raises(ValueError, match="does not support: data.packing=true"):
        load_parts(_cfg(tmp_path, student_tokenizer_dir, "uld", data__packing=True), torch.device("cpu"))


def test_student_tokenizer_key_needs_a_fresh_student(tmp_path, student_tokenizer_dir):
    cfg = _cfg(tmp_path, student_tokenizer_dir, "uld")
    cfg.student.config, cfg.student.path = None, "somewhere"
    with pytest.raises(ValueError, match="student.tokenizer is for a fresh student"):
        cfg.validate()


def test_builtin_teacher_distils_into_a_byte_level_bpe_student(tmp_path, student_tokenizer_dir):
    """The real path: the word-level built-in teacher, a student with a BPE tokenizer trained here, a mixed
    objective; every term finite and non-zero, the student saved with ITS tokenizer."""
    from potstill import distill

    cfg = _cfg(tmp_path, student_tokenizer_dir, "0.5*ce + uld + gold + alm")
    result = distill(cfg, progress=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert all(math.isfinite(r[f"term/{n}"]) and r[f"term/{n}"] > 0 for n in ("ce", "uld", "gold", "alm"))
    saved = load_tokenizer(str(result.final_dir))
    assert len(saved) == len(load_tokenizer(str(student_tokenizer_dir)))
    assert "kl_teacher_student" not in [r for r in rows if r["kind"] == "eval"][-1]


def test_identical_tokenizers_reduce_the_aligned_path_to_the_same_vocabulary_one():
    """An AlignedTeacher that aligns every position with itself (identity map, every token exact and its own chunk)
    gives the same value and gradients as the same-vocabulary forms on DenseLogits."""
    hidden, weight, labels, _ = _synthetic(2)
    g = torch.Generator().manual_seed(3)
    teacher = 2 * torch.randn(len(CHUNK), VS, generator=g)
    n = len(CHUNK)
    labelled = labels != -100
    teacher_y = F.log_softmax(teacher, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    chunk = torch.where(labelled, torch.arange(n), -1)
    aligned = AlignedTeacher(DenseLogits(teacher), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
                             chunk, torch.where(labelled, teacher_y, 0.0), torch.arange(VS))
    objective = parse_objective("uld + gold(beta=0.2) + alm(tau=5)", 1.5)
    results = []
    for target in (aligned, DenseLogits(teacher)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_loss(h, w, None, labels, objective, target, chunk_size=4)
        out.total.backward()
        results.append((out.term_sums, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_truncation_keeps_whole_chunks_and_cuts_the_teacher():
    """Student tokens 0..5, kept 4 (max_length): the chunk (3, 4, 5) loses its tail, so it is aligned (its first
    token is kept) but no ALM chunk; the teacher is cut after the last token a kept chunk names."""
    chunks = [ChunkPair(range(1, 2), range(1, 3), False), ChunkPair(range(2, 3), range(3, 4), True),
              ChunkPair(range(3, 6), range(4, 6), False), ChunkPair(range(6, 7), range(6, 7), True)]
    out = example_alignment(chunks, 4, [10, 11, 12, 13, 14, 15, 16], [0, 1, 2, 3])
    assert out["xtok_teacher_ids"] == [10, 11, 12, 13, 14, 15]
    assert out["xtok_positions"] == [0, 2, 3]
    assert out["xtok_exact"] == [0, 1, 0]
    assert out["xtok_chunk"] == [0, 1, -1]
    assert out["xtok_teacher_chunk"] == [0, 0, 1, -1, -1]
    # a prompt (unlabelled) token in a chunk keeps it out of ALM; ULD still aligns its first position
    out = example_alignment(chunks, 7, list(range(7)), [0, -100, 2, 3, 4, 5, 6])
    assert out["xtok_chunk"] == [-1, 0, 1, 1, 1, 2]
    assert out["xtok_positions"] == [0, 2, 3, -1, -1, 5]


def test_chat_records_are_refused_in_one_line(word_level, bpe_pair):
    with pytest.raises(ValueError, match="data.jsonl:4: cross-tokenizer distillation reads 'text' or 'prompt'"):
        Aligner(word_level, bpe_pair[0])({"messages": [{"role": "user", "content": "hi"}]}, [1, 2], [1, 2],
                                         "data.jsonl:4")


def test_a_student_path_with_its_own_tokenizer_makes_a_cross_tokenizer_run(tmp_path, student_tokenizer_dir):
    """student.path whose directory holds a BPE tokenizer: the data tokenizer is the student's, the teacher keeps its
    own 479-token head, and every teacher id with a same-piece student id is mapped."""
    from potstill.assemble import load_parts
    from tests.conftest import save_tiny_model

    bpe = load_tokenizer(str(student_tokenizer_dir))
    student_dir = save_tiny_model(tmp_path / "student", "llama", bpe, layers=1)
    cfg = _cfg(tmp_path, student_tokenizer_dir, "0.5*ce + alm")
    cfg.student.config, cfg.student.tokenizer, cfg.student.path = None, None, str(student_dir)
    parts = load_parts(cfg, torch.device("cpu"))
    assert parts.crosstok is not None and len(parts.tokenizer) == len(bpe) == parts.vocab
    mapping = parts.crosstok.teacher.mapping
    assert mapping.shape == (479,)
    the = load_tokenizer(resolve_model_path("builtin")).convert_tokens_to_ids("the")
    assert int(mapping[the]) == bpe.convert_tokens_to_ids("the")


def test_live_teacher_target_equals_the_teacher_run_on_each_text_alone(model_dirs, student_tokenizer_dir):
    """Two texts of different lengths in one padded batch: the live target's rows are the teacher's logits (its own
    forward on each text alone, unpadded) at the aligned positions, and its chunk likelihoods the sums of the
    teacher's log-probs of its own tokens over each chunk."""
    from transformers import AutoModelForCausalLM

    from potstill.crosstok.targets import LiveAlignedTeacher
    from potstill.models import HiddenAndHead

    teacher_tok, bpe = load_tokenizer(resolve_model_path("builtin")), load_tokenizer(str(student_tokenizer_dir))
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    aligner = Aligner(teacher_tok, bpe)
    texts = ["the cats open every dog .", "a bird wants this big kite . those cows usually open this dog ."]
    examples = []
    for i, text in enumerate(texts):
        ids = bpe(text)["input_ids"] + [bpe.eos_token_id]
        examples.append(Example(i, ids, list(ids), extra=aligner({"text": text}, ids, list(ids), "t")))
    batch = collate(examples, bpe.pad_token_id)
    mapping = vocab_map(teacher_tok, bpe, len(teacher_tok), len(bpe))
    target = LiveAlignedTeacher(HiddenAndHead(teacher, len(teacher_tok)), mapping, chunk_size=4).target(batch)
    width = batch["input_ids"].shape[1] - 1
    assert batch["xtok_teacher_ids"].shape[1] > len(examples[0].extra["xtok_teacher_ids"])  # the first row is padded
    for r, e in enumerate(examples):
        assert max(e.extra["xtok_chunk"]) >= 3 and sum(j >= 0 for j in e.extra["xtok_positions"]) >= 3
        t_ids = torch.tensor([e.extra["xtok_teacher_ids"]])
        with torch.no_grad():
            logits = teacher(t_ids).logits[0, :, : len(teacher_tok)]
        logp = F.log_softmax(logits, -1)
        for i, j in enumerate(e.extra["xtok_positions"]):
            if j >= 0:
                got = target.rows.chunk_logits(slice(r * width + i, r * width + i + 1))[0]
                torch.testing.assert_close(got, logits[j], rtol=1e-4, atol=1e-5)
        for c in range(max(e.extra["xtok_chunk"]) + 1):
            members = [j for j, k in enumerate(e.extra["xtok_teacher_chunk"]) if k == c]
            expected = sum(logp[j, t_ids[0, j + 1]] for j in members)
            assert target.chunk_teacher_logp[r * width + c].item() == pytest.approx(expected.item(), rel=1e-5)
        assert target.aligned[r * width: r * width + len(e.input_ids) - 1].tolist() == \
            [j >= 0 for j in e.extra["xtok_positions"]]
