from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.evaluate import CalibrationBins, evaluate, expected_calibration_error, generate_sample

VOCAB = 64


def naive_ece(confidence: list[float], correct: list[bool], n_bins: int) -> float:
    """Straight from the definition: bins (i/n, (i+1)/n], 0 in bin 0, Σ_b n_b/N·|acc_b − conf_b|."""
    total, ece = len(confidence), 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        members = [k for k, c in enumerate(confidence) if lo < c <= hi or (i == 0 and c == 0)]
        if members:
            conf = sum(confidence[k] for k in members) / len(members)
            acc = sum(correct[k] for k in members) / len(members)
            ece += len(members) / total * abs(acc - conf)
    return ece


def test_ece_six_tokens_by_hand():
    confidence = torch.tensor([0.1, 0.3, 0.35, 0.9, 0.95, 1.0], dtype=torch.float64)
    correct = torch.tensor([False, True, False, True, True, False])
    # 5 bins of width 0.2: {0.1} acc 0 conf 0.1; {0.3, 0.35} acc 0.5 conf 0.325; {0.9, 0.95, 1.0} acc 2/3 conf 0.95
    # ECE = (1·0.1 + 2·0.175 + 3·(0.95 − 2/3)) / 6 = 1.3 / 6
    ece, bins = expected_calibration_error(confidence, correct, n_bins=5)
    assert ece == pytest.approx(1.3 / 6, abs=1e-12)
    assert ece == pytest.approx(naive_ece(confidence.tolist(), correct.tolist(), 5), abs=1e-12)
    assert bins[0] == pytest.approx([0.1, 0.0, 1])
    assert bins[1] == pytest.approx([0.325, 0.5, 2])
    assert bins[2] == [0.5, 0.0, 0]  # empty bin: its center
    assert bins[4] == pytest.approx([0.95, 2 / 3, 3])


def test_ece_bin_edges_zero_and_one():
    # 0 goes to bin 0; an upper edge belongs to its own bin ((lo, hi]); 1.0 to the last bin.
    confidence = torch.tensor([0.0, 0.2, 0.2000001, 1.0], dtype=torch.float64)
    _, bins = expected_calibration_error(confidence, torch.ones(4, dtype=torch.bool), n_bins=5)
    assert [b[2] for b in bins] == [2, 1, 0, 0, 1]


def test_ece_matches_naive_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(500, generator=g, dtype=torch.float64)
    correct = torch.rand(500, generator=g) < confidence
    ece, _ = expected_calibration_error(confidence, correct)
    assert ece == pytest.approx(naive_ece(confidence.tolist(), correct.tolist(), 15), abs=1e-12)


def test_streaming_bins_equal_one_shot():
    g = torch.Generator().manual_seed(1)
    confidence, correct = torch.rand(103, generator=g), torch.rand(103, generator=g) < 0.5
    streamed = CalibrationBins(15)
    for start in range(0, 103, 10):
        streamed.add(confidence[start : start + 10], correct[start : start + 10])
    assert streamed.result() == expected_calibration_error(confidence, correct, 15)


def test_ece_of_nothing_is_nan():
    ece, bins = CalibrationBins(3).result()
    assert math.isnan(ece) and [b[2] for b in bins] == [0, 0, 0]


# ---- evaluate against a dense reference ------------------------------------------------------------------------


def tiny_llama(seed: int, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def make_batches() -> list[dict]:
    g = torch.Generator().manual_seed(2)
    batches = []
    for b, t in [(2, 7), (3, 5)]:
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[1, -2:] = 0  # right padding on the second row
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 2] = -100  # an ignored position mid-sequence
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def dense_reference(student, teacher, batches, vocab: int) -> dict[str, float]:
    """Metrics from the full (B, T, V) logits of ``model(...)``: what the chunked path must reproduce."""
    nll_s, nll_t, kls, agree, accept, conf, correct = [], [], [], [], [], [], []
    with torch.no_grad():
        for batch in batches:
            zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
            zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab]
            labels = batch["labels"][:, 1:]
            valid = labels != -100
            logq, logp, y = zs[valid].log_softmax(-1), zt[valid].log_softmax(-1), labels[valid]
            nll_s.append(-logq.gather(-1, y[:, None]).squeeze(-1))
            nll_t.append(-logp.gather(-1, y[:, None]).squeeze(-1))
            kls.append((logp.exp() * (logp - logq)).sum(-1))
            agree.append(logq.argmax(-1) == logp.argmax(-1))
            accept.append(torch.minimum(logp.exp(), logq.exp()).sum(-1))  # Σ_v min(p, q) at T = 1
            conf.append(logq.exp().max(-1).values)
            correct.append(logq.argmax(-1) == y)
    cat = lambda xs: torch.cat(xs).double()  # noqa: E731
    return {
        "student_ce": cat(nll_s).mean().item(),
        "teacher_ce": cat(nll_t).mean().item(),
        "kl_teacher_student": cat(kls).mean().item(),
        "top1_agreement": cat(agree).mean().item(),
        "acceptance_alpha": cat(accept).mean().item(),
        "ece": naive_ece(cat(conf).tolist(), cat(correct).tolist(), 15),
        "tokens": len(cat(nll_s)),
    }


@pytest.mark.parametrize("teacher_vocab", [VOCAB, VOCAB + 8])  # +8: a padded teacher head, trimmed to VOCAB
def test_evaluate_matches_dense_reference(teacher_vocab):
    student, teacher = tiny_llama(0), tiny_llama(1, teacher_vocab)
    student.train(), teacher.eval()  # different modes, both must come back as they were
    batches = make_batches()
    result = evaluate(student, batches, teacher=teacher, vocab=VOCAB, chunk_size=4)  # chunks split both batches (9 scored positions each)
    ref = dense_reference(student, teacher, batches, VOCAB)
    m = result.metrics
    assert m["tokens"] == ref["tokens"] == 9 + 9
    for key in ("student_ce", "teacher_ce", "kl_teacher_student", "top1_agreement", "acceptance_alpha", "ece"):
        assert m[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-9), key
    assert m["student_ppl"] == pytest.approx(math.exp(ref["student_ce"]), rel=1e-5)
    assert m["teacher_ppl"] == pytest.approx(math.exp(ref["teacher_ce"]), rel=1e-5)
    assert sum(b[2] for b in result.calibration) == ref["tokens"] and len(result.calibration) == 15
    assert student.training and not teacher.training  # each model's mode restored


def test_evaluate_result_does_not_depend_on_chunk_size():
    student, teacher = tiny_llama(0), tiny_llama(1)
    small = evaluate(student, make_batches(), teacher=teacher, vocab=VOCAB, chunk_size=1).metrics
    large = evaluate(student, make_batches(), teacher=teacher, vocab=VOCAB, chunk_size=4096).metrics
    assert small == pytest.approx(large, rel=1e-5, abs=1e-9)  # relative: fp32 reassociation differs by CPU


def naive_sampling_probs(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """From the definition: greedy = point mass on the argmax; else softmax(z / T), keep the most likely tokens
    while the mass ranked above a token is < top_p, renormalise."""
    if temperature == 0:
        best = max(range(len(logits)), key=lambda i: logits[i])
        return [1.0 if i == best else 0.0 for i in range(len(logits))]
    weights = [math.exp((z - max(logits)) / temperature) for z in logits]
    probs = [w / sum(weights) for w in weights]
    kept, above = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if above < top_p:
            kept.add(i)
        above += probs[i]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def naive_acceptance(student, teacher, batches, temperature: float, top_p: float) -> float:
    """Token mean of Σ_v min(p, q) over labelled positions, one position at a time, in float64 Python."""
    values = []
    with torch.no_grad():
        for batch in batches:
            zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            valid = batch["labels"][:, 1:] != -100
            for z_s, z_t in zip(zs[valid].double().tolist(), zt[valid].double().tolist()):
                q, p = (naive_sampling_probs(z, temperature, top_p) for z in (z_s, z_t))
                values.append(sum(min(a, b) for a, b in zip(p, q)))
    return sum(values) / len(values)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.5, 0.3)])
def test_acceptance_alpha_matches_naive_reference_at_the_decoding_settings(temperature, top_p):
    student, teacher = tiny_llama(0), tiny_llama(1)
    batches = make_batches()
    m = evaluate(student, batches, teacher=teacher, vocab=VOCAB, chunk_size=4, acceptance_temperature=temperature,
                 acceptance_top_p=top_p).metrics
    assert m["acceptance_alpha"] == pytest.approx(naive_acceptance(student, teacher, batches, temperature, top_p), rel=1e-5)
    plain = evaluate(student, batches, teacher=teacher, vocab=VOCAB, chunk_size=4).metrics
    drop = lambda d: {k: v for k, v in d.items() if k != "acceptance_alpha"}  # noqa: E731
    assert drop(m) == drop(plain)  # the other metrics stay at T = 1


def test_greedy_acceptance_is_top1_agreement():
    teacher = tiny_llama(1)
    student = tiny_llama(1)  # the teacher with a perturbed head: it agrees on some argmaxes, not all
    with torch.no_grad():
        student.lm_head.weight.add_(0.005 * torch.randn(student.lm_head.weight.shape, generator=torch.Generator().manual_seed(5)))
    m = evaluate(student, make_batches(), teacher=teacher, vocab=VOCAB, chunk_size=5, acceptance_temperature=0.0).metrics
    assert m["acceptance_alpha"] == m["top1_agreement"]
    assert 0.2 < m["top1_agreement"] < 0.9  # agreement on some positions only, so this compares something


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_acceptance_alpha_does_not_depend_on_chunk_size(temperature, top_p):
    student, teacher = tiny_llama(0), tiny_llama(1)
    alphas = [evaluate(student, make_batches(), teacher=teacher, vocab=VOCAB, chunk_size=c, acceptance_temperature=temperature,
                       acceptance_top_p=top_p).metrics["acceptance_alpha"] for c in (1, 3, 4096)]
    assert alphas == pytest.approx([alphas[0]] * 3, rel=1e-6)


def test_acceptance_settings_are_checked():
    with pytest.raises(ValueError, match=r"acceptance.top_p must be in \(0, 1\]"):
        evaluate(tiny_llama(0), make_batches(), teacher=tiny_llama(1), vocab=VOCAB, acceptance_top_p=0.0)
    with pytest.raises(ValueError, match=r"acceptance.temperature must be 0 \(greedy\) or a finite number ≥ 0.001"):
        evaluate(tiny_llama(0), make_batches(), teacher=tiny_llama(1), vocab=VOCAB, acceptance_temperature=-1.0)


def test_evaluate_student_as_its_own_teacher():
    student = tiny_llama(0)
    m = evaluate(student, make_batches(), teacher=student, vocab=VOCAB, chunk_size=3).metrics
    assert m["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert m["top1_agreement"] == 1.0
    assert m["acceptance_alpha"] == pytest.approx(1.0, rel=1e-6)
    assert m["teacher_ce"] == pytest.approx(m["student_ce"], rel=1e-6)


def test_evaluate_without_teacher_reports_student_metrics_only():
    m = evaluate(tiny_llama(0), make_batches(), vocab=VOCAB).metrics
    assert set(m) == {"student_ce", "student_ppl", "ece", "tokens"}


def test_evaluate_rejects_labels_outside_vocab():
    batch = make_batches()[0]
    batch["labels"][0, 3] = VOCAB
    with pytest.raises(ValueError, match="labels must lie in"):
        evaluate(tiny_llama(0), [batch], vocab=VOCAB)


# ---- samples ---------------------------------------------------------------------------------------------------


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def test_generate_sample_is_seeded_and_leaves_rng_untouched():
    model, tokenizer = tiny_llama(0), word_tokenizer()
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_sample(model, tokenizer, "w5 w6 w7", max_new_tokens=8, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert first.startswith("w5 w6 w7") and len(first) > len("w5 w6 w7")
    assert generate_sample(model, tokenizer, "w5 w6 w7", max_new_tokens=8, seed=3) == first
    assert model.training


def test_generate_sample_from_empty_prompt_starts_at_a_special_token():
    text = generate_sample(tiny_llama(0), word_tokenizer(), "", max_new_tokens=5, seed=0)
    assert text and not text.startswith("</s>")  # special tokens are skipped in the text
