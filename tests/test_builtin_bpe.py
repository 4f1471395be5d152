"""The built-in byte-level BPE tokenizer: a different tokenisation of the built-in text than the word-level one,
lossless, byte-exact offsets, the same special-token conventions, deterministic, shipped as built."""
import json

from potstill.builtin.bpe import NAME, SHIPPED, VOCAB_SIZE, build_bpe_tokenizer, fast_bpe_tokenizer
from potstill.builtin.grammar import builtin_texts
from potstill.builtin.tokenizer import SPECIAL_TOKENS
from potstill.crosstok import align, byte_spans
from potstill.data.encode import encode_all
from potstill.models import load_tokenizer

MULTI_BYTE = "the café costs 5 € , 日本 cats 🐈 sleep ."


def _model_json(tokenizer) -> dict:
    """Vocabulary and merges, order-independent (the trainer's JSON writes the vocabulary in hash order)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return {"vocab": sorted(model["vocab"].items()), "merges": model["merges"]}


def test_bpe_tokenisation_differs_from_the_word_level_one(tokenizer):
    bpe = load_tokenizer(NAME)
    text = builtin_texts("validation", 1)[0]
    word_ids, bpe_ids = tokenizer(text)["input_ids"], bpe(text)["input_ids"]
    assert len(bpe) == VOCAB_SIZE
    assert len(bpe_ids) > len(word_ids)  # rarer words split into several tokens
    alignment = align(byte_spans(tokenizer, text), byte_spans(bpe, text))
    assert 0 < len(alignment.exact) < len(alignment.chunks)  # some words are one token on both sides, some not
    assert all(c.end - c.start > 0 for c in alignment.chunks)


def test_bpe_round_trips_text_byte_for_byte():
    bpe = load_tokenizer(NAME)
    for text in [*builtin_texts("validation", 5), MULTI_BYTE, "  two  spaces\nand a newline "]:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(ids) == text


def test_bpe_offsets_are_byte_exact():
    """Every token's byte span is the bytes it decodes to (its leading space included), on ASCII and on
    multi-byte text; a token holding part of a character gets an empty span and the character goes to the last
    token holding its bytes (crosstok rule), so the spans still tile the text."""
    bpe = load_tokenizer(NAME)
    for text in [builtin_texts("validation", 1)[0], MULTI_BYTE]:
        spans = byte_spans(bpe, text)
        data = text.encode()
        assert spans.special[0] and spans.ids[0] == bpe.bos_token_id
        assert b"".join(data[s:e] for s, e in zip(spans.starts, spans.ends)) == data
        pieces = {i: p for i, p in enumerate(spans.pieces) if not spans.special[i] and "\ufffd" not in p.decode(errors="replace")}
        for i, piece in pieces.items():  # tokens made of whole characters
            assert data[spans.starts[i]:spans.ends[i]] == piece
        assert len(pieces) < len(spans) - 1 or text.isascii()  # the multi-byte text does split characters


def test_bpe_special_tokens_follow_the_word_level_conventions(tokenizer):
    bpe = load_tokenizer(NAME)
    assert bpe.convert_ids_to_tokens(list(range(4))) == SPECIAL_TOKENS
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(bpe, name) == getattr(tokenizer, name)
    ids = bpe("the cat")["input_ids"]
    assert ids[0] == bpe.bos_token_id and bpe.eos_token_id not in ids  # BOS added, EOS left to the data pipeline
    conversation = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"},
                                 {"role": "user", "content": "why"}, {"role": "assistant", "content": "big dogs"}]}
    assert bpe.apply_chat_template(conversation["messages"], tokenize=False) == \
        tokenizer.apply_chat_template(conversation["messages"], tokenize=False).strip()  # the same turns
    (example,), _ = encode_all(bpe, [(0, conversation)], 64, "test")  # assistant tokens found by prefix rendering
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    assert bpe.decode(trained) == " a dog </s> big dogs </s>"


def test_bpe_training_is_deterministic_and_the_shipped_copy_is_a_fresh_build(tmp_path):
    fresh = build_bpe_tokenizer(tmp_path / "bpe")
    assert _model_json(fresh) == _model_json(fast_bpe_tokenizer())
    shipped = load_tokenizer(str(SHIPPED))
    assert _model_json(fresh) == _model_json(shipped) and fresh.chat_template == shipped.chat_template
