"""Bits per byte: which bytes each labelled token stands for (hand-counted), that they sum to the trained text's
UTF-8 length whatever the tokenizer, exact values on a model whose NLL is known, and the identity
bpb = nats/token · tokens/bytes / ln 2 on the real evaluation path."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.builtin.grammar import builtin_texts
from potstill.crosstok import byte_spans
from potstill.crosstok.bpb import attach_token_bytes, bits_per_byte, token_bytes
from potstill.data.batches import eval_batches
from potstill.data.encode import encode_all
from potstill.evaluate import evaluate, evaluate_on_own_tokens
from potstill.labels import IGNORE_INDEX
from potstill.models import load_tokenizer

MULTI_BYTE = [(0, {"prompt": "the cat", "completion": " drinks café in 日本 🐈 ."}),
              (1, {"text": "é€ the dog 🐈"}),
              (2, {"prompt": "the ca", "completion": "t sat ."})]  # BPE merges "Ġcat" across the prompt boundary


def encoded(tokenizer, records, max_length=128):
    examples, _ = encode_all(tokenizer, records, max_length, "test")
    attach_token_bytes(tokenizer, examples, records, "test")
    return examples


def labelled_bytes(example) -> int:
    """Σ bytes over the positions the loss and evaluation score (labels[1:] != -100)."""
    return sum(b for b, lab in zip(example.extra["token_bytes"][1:], example.labels[1:]) if lab != IGNORE_INDEX)


def trained_text(record) -> str:
    return record.get("completion", record.get("text"))


def test_token_bytes_by_hand_word_level(tokenizer):
    """<s> the cat sat: the space a word-level tokenizer drops belongs to the next word."""
    assert token_bytes(byte_spans(tokenizer, "the cat  sat ")) == [0, 3, 4, 6]  # "the", " cat", "  sat " (trailing)
    # only the completion's bytes count: prompt "the cat", completion " sat"
    assert token_bytes(byte_spans(tokenizer, "the cat sat"), region_start=7) == [0, 0, 0, 4]


def test_token_bytes_by_hand_bpe():
    bpe = load_tokenizer("builtin:bpe")
    spans = byte_spans(bpe, "the cat 日")
    pieces = [p for p, s in zip(spans.pieces, spans.special) if not s]
    owned = token_bytes(spans)
    assert owned[0] == 0 and sum(owned) == len("the cat 日".encode())  # 3 + 4 + 4 ("Ġ" + 3-byte character)
    assert [b for b, p in zip(owned[1:], pieces)][:2] == [3, 4]


@pytest.mark.parametrize("which", ["word", "bpe"])
def test_labelled_bytes_sum_to_the_trained_texts_utf8_length(tokenizer, which):
    """Per example the labelled tokens' bytes are exactly the completion's (or text's) UTF-8 bytes: with EOS
    (0 bytes), multi-byte characters split by BPE, and a BPE token merging across the prompt boundary."""
    tok = tokenizer if which == "word" else load_tokenizer("builtin:bpe")
    records = [*MULTI_BYTE, *[(10 + i, {"text": t}) for i, t in enumerate(builtin_texts("validation", 4))]]
    for example in encoded(tok, records):
        record = dict(records)[example.example_id]
        assert "token_bytes" in example.extra
        assert labelled_bytes(example) == len(trained_text(record).encode("utf-8"))
        assert example.extra["token_bytes"][-1] == 0 and example.input_ids[-1] == tok.eos_token_id


def test_truncated_examples_count_only_their_kept_tokens(tokenizer):
    record = (0, {"text": "the cat sat on the dog ."})
    (example,) = encoded(tokenizer, [record], max_length=4)  # <s> the cat sat
    assert example.extra["token_bytes"] == [0, 3, 4, 4]


def test_an_example_that_is_not_its_texts_tokenisation_gets_no_byte_count(tokenizer):
    """...and then no example of the set gets one: bpb over part of the data would not be the data's bpb."""
    records = [(0, {"text": "the cat"}), (1, {"text": "the dog"})]
    examples = encoded(tokenizer, records)
    assert examples[0].extra["token_bytes"] == [0, 3, 4, 0]
    examples = encode_all(tokenizer, records, 128, "test")[0]
    examples[1].input_ids[1] = 9  # as if encoded differently
    assert not attach_token_bytes(tokenizer, examples, records, "test")
    assert all("token_bytes" not in e.extra for e in examples)
    assert "token_bytes" not in eval_batches(examples, 4, tokenizer.pad_token_id)[0]
    assert "bpb" not in evaluate(uniform_model(len(tokenizer)), eval_batches(examples, 4, tokenizer.pad_token_id),
                                 vocab=len(tokenizer)).metrics


def uniform_model(vocab: int) -> LlamaForCausalLM:
    """A model whose every next-token distribution is uniform (zero head): NLL = ln V per token, exactly."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    torch.nn.init.zeros_(model.lm_head.weight)
    return model


def test_bits_per_byte_exact_on_a_uniform_model(tokenizer):
    """text "the cat sat": labels the, cat, sat, </s> = 4 tokens over 3 + 4 + 4 + 0 = 11 bytes;
    prompt "the cat" + " sat on": labels sat, on, </s> = 3 tokens over 4 + 3 + 0 = 7 bytes.
    Uniform over V: bpb = tokens · log2 V / bytes."""
    vocab = len(tokenizer)
    records = [(0, {"text": "the cat sat"}), (1, {"prompt": "the cat", "completion": " sat on"})]
    batches = eval_batches(encoded(tokenizer, records), 2, tokenizer.pad_token_id)
    metrics = evaluate(uniform_model(vocab), batches, vocab=vocab).metrics
    assert metrics["tokens"] == 7 and metrics["bytes"] == 18
    assert metrics["bpb"] == pytest.approx(7 * math.log2(vocab) / 18, rel=1e-6)
    assert bits_per_byte(7 * math.log(vocab), 18) == pytest.approx(7 * math.log2(vocab) / 18, rel=1e-12)


def test_bpb_is_nats_per_token_times_tokens_per_byte_over_ln2(tokenizer, model_dirs):
    """Same tokenizer: bpb = student_ce · tokens / bytes / ln 2, and teacher_bpb likewise from teacher_ce."""
    from potstill.models import load_causal_lm
    student, teacher = (load_causal_lm(str(model_dirs[k])) for k in ("gpt2_student", "llama_teacher"))
    records = [(i, {"text": t}) for i, t in enumerate(builtin_texts("validation", 6))]
    batches = eval_batches(encoded(tokenizer, records), 4, tokenizer.pad_token_id)
    m = evaluate(student, batches, teacher=teacher, vocab=len(tokenizer), chunk_size=16).metrics
    assert m["bytes"] == sum(len(t.encode()) for _, r in records for t in [r["text"]])
    assert m["bpb"] == pytest.approx(m["student_ce"] * m["tokens"] / m["bytes"] / math.log(2), rel=1e-6)
    assert m["teacher_bpb"] == pytest.approx(m["teacher_ce"] * m["tokens"] / m["bytes"] / math.log(2), rel=1e-6)


def test_teacher_bpb_on_its_own_tokenisation_covers_the_same_bytes(tokenizer, model_dirs):
    """A word-level teacher scored on its own tokens, a BPE student on its own: other token counts, the same
    bytes, so the two bpb are comparable; the teacher's value is its own NLL over those bytes."""
    from potstill.models import load_causal_lm
    bpe = load_tokenizer("builtin:bpe")
    records = [(i, {"prompt": t[:40], "completion": t[40:]}) for i, t in enumerate(builtin_texts("validation", 5))]
    teacher = load_causal_lm(str(model_dirs["llama_teacher"]))
    student = uniform_model(len(bpe))
    student_side = evaluate(student, eval_batches(encoded(bpe, records), 4, bpe.pad_token_id), vocab=len(bpe)).metrics
    teacher_batches = eval_batches(encoded(tokenizer, records), 4, tokenizer.pad_token_id)
    teacher_side = evaluate_on_own_tokens(teacher, teacher_batches, vocab=len(tokenizer))
    plain = evaluate(teacher, teacher_batches, vocab=len(tokenizer)).metrics
    assert student_side["bytes"] == teacher_side["teacher_bytes"] == sum(len(r["completion"].encode()) for _, r in records)
    assert student_side["tokens"] > teacher_side["teacher_tokens"]
    assert teacher_side["teacher_bpb"] == plain["bpb"] and teacher_side["teacher_ce"] == plain["student_ce"]
    assert student_side["bpb"] == pytest.approx(student_side["tokens"] * math.log2(len(bpe)) / student_side["bytes"], rel=1e-6)


def test_teacher_and_student_encodings_must_score_the_same_bytes(tokenizer):
    """teacher_bpb is only comparable over the same bytes: data.max_length counts tokens, so a text cut on one side
    is cut at another byte on the other, and the check names the example."""
    from potstill.crosstok.bpb import same_bytes_problem
    bpe = load_tokenizer("builtin:bpe")
    records = [(i, {"text": t}) for i, t in enumerate(builtin_texts("validation", 3))]
    assert same_bytes_problem(encoded(bpe, records, 256), encoded(tokenizer, records, 256)) is None
    problem = same_bytes_problem(encoded(bpe, records, 40), encoded(tokenizer, records, 40))
    assert problem.startswith("held-out example 0 is cut at another byte") and "raise data.max_length" in problem
    assert same_bytes_problem(encoded(bpe, records[:2], 256), encoded(tokenizer, records, 256)) == \
        "the two tokenizers keep different held-out examples"
