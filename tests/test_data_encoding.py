"""Encoding guarantees: one-text prompt/completion with a checked boundary, template-marked chat masks, stable
example ids (= record positions in the file), counted truncation/drops, and decoding errors naming file:line."""
from __future__ import annotations

import copy
import json
import logging

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

from potstill.assemble import load_examples
from potstill.config import RunConfig
from potstill.data.encode import encode_all
from potstill.data.loading import load_records
from potstill.labels import IGNORE_INDEX


@pytest.fixture(scope="module")
def bpe():
    """A real byte-level BPE (GPT-2 style: 'Ġ' = leading space) trained here, with BOS from the post-processor."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["The answer is 42 .", "the answer was 7 .", "is it 42 ?"] * 50, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def trained_tokens(tok, example) -> list[str]:
    return tok.convert_ids_to_tokens([t for t in example.labels if t != IGNORE_INDEX])


def encode_one(tok, record, max_length=128):
    (example,), _ = encode_all(tok, [(0, record)], max_length, "test")
    return example


def test_prompt_completion_is_one_text_and_boundary_merges_are_masked_by_offsets(bpe):
    plain = encode_one(bpe, {"prompt": "The answer is", "completion": " 42"})
    assert bpe.convert_ids_to_tokens(plain.input_ids) == ["<s>", "The", "Ġanswer", "Ġis", "Ġ42", "</s>"]
    assert trained_tokens(bpe, plain) == ["Ġ42", "</s>"]
    # Trailing space in the prompt: alone it ends in 'Ġ', but the joint text merges it into 'Ġ42'.
    assert bpe.tokenize("The answer is ")[-1] == "Ġ"
    spaced = encode_one(bpe, {"prompt": "The answer is ", "completion": "42"})
    assert spaced.input_ids == plain.input_ids  # what the model sees when it reads the text
    assert trained_tokens(bpe, spaced) == ["Ġ42", "</s>"]  # the merged token reaches past the prompt: trained
    # A merge inside a word: 'Ġanswer' straddles the boundary, so it and everything after it are trained.
    split_word = encode_one(bpe, {"prompt": "The ans", "completion": "wer is 42"})
    assert split_word.input_ids == plain.input_ids
    assert trained_tokens(bpe, split_word) == ["Ġanswer", "Ġis", "Ġ42", "</s>"]


class SlowWordTokenizer(PreTrainedTokenizer):
    """A real pure-Python ("slow") tokenizer, splitting on whitespace: it has no offset mapping."""

    def __init__(self, words, **kwargs):
        self.vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
        super().__init__(unk_token="<unk>", eos_token="</s>", **kwargs)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)

    def _tokenize(self, text):
        return text.split()

    def _convert_token_to_id(self, token):
        return self.vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return {i: w for w, i in self.vocab.items()}[index]


def test_boundary_merge_without_offsets_is_refused_not_misaligned():
    tok = SlowWordTokenizer(["the", "answer", "is", "42", "ans", "wer"])
    assert not tok.is_fast
    plain = encode_one(tok, {"prompt": "the answer is", "completion": " 42"})
    assert trained_tokens(tok, plain) == ["42", "</s>"]
    with pytest.raises(ValueError, match=r"d.jsonl:1: the prompt's last token merges with the completion's first, "
                                         r"and this tokenizer gives no character offsets"):
        encode_all(tok, [(0, {"prompt": "the ans", "completion": "wer is 42"})], 64, "d.jsonl")


GENERATION_TEMPLATE = (  # renders a turn count first, so renderings of prefixes are NOT prefixes of each other
    "{{ messages | length }} "
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} {{ eos_token }}{% endgeneration %} "
    "{% else %}{{ message['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHAT = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"},
                     {"role": "user", "content": "the man"}, {"role": "assistant", "content": "runs"}]}


def test_chat_mask_comes_from_generation_blocks(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GENERATION_TEMPLATE
    example = encode_one(tok, CHAT)
    assert tok.convert_ids_to_tokens(example.input_ids)[:4] == ["4", "user", ":", "the"]
    assert trained_tokens(tok, example) == ["a", "dog", "</s>", "runs", "</s>"]


def test_chat_without_generation_blocks_falls_back_to_prefix_rendering(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GENERATION_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match=r"test: record 0: the chat template does not render conversation prefixes"):
        encode_one(tok, CHAT)  # the fallback's own check: this template's prefixes are inconsistent
    assert trained_tokens(tokenizer, encode_one(tokenizer, CHAT)) == ["a", "dog", "</s>", "runs", "</s>"]


def write_jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def line_of(path, example_id) -> dict:
    return json.loads(path.read_text().splitlines()[example_id])


def check_ids_are_lines(tok, path, examples):
    for e in examples:
        expected = tok(line_of(path, e.example_id)["text"])["input_ids"] + [tok.eos_token_id]
        assert e.input_ids == expected[: len(e.input_ids)], e.example_id


def test_example_ids_are_line_positions_whatever_the_split(tmp_path, tokenizer):
    from potstill.builtin import builtin_texts

    texts = builtin_texts("train", 120)
    rows = [{"text": t} for t in texts]
    rows[30] = {"messages": [{"role": "user", "content": "the cat"}]}  # nothing to learn: dropped, its id unused
    train = write_jsonl(tmp_path / "train.jsonl", rows, blank_after=9)  # line 11 blank: ids after it are line − 1
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in texts[:5]])
    base = [f"data.train={train}", "data.max_length=512", "data.max_eval_examples=1000"]

    def ids(overrides):
        cfg = RunConfig.from_yaml(None, base + overrides, check_run=False)
        tr, held = load_examples(cfg, tokenizer)
        return tr, held

    tr, held = ids([])  # every 50th record held out: records 50 and 100 of the file = lines 51 and 101 (blank at 11)
    assert [e.example_id for e in held] == [50, 100]
    assert [e.example_id for e in tr] == [i for i in range(121) if i not in (10, 31, 50, 100)]
    check_ids_are_lines(tokenizer, train, tr + held)
    with_val, held = ids([f"data.validation={val}"])
    assert [e.example_id for e in with_val] == [i for i in range(121) if i not in (10, 31)]
    assert [e.example_id for e in held] == [0, 1, 2, 3, 4]
    check_ids_are_lines(tokenizer, train, with_val)
    by_id = {e.example_id: e for e in with_val}
    assert all(by_id[e.example_id].input_ids == e.input_ids for e in tr)  # same id, same tokens: cache-compatible
    limited, held = ids(["data.max_train_examples=60"])
    assert [e.example_id for e in held] == [50]
    assert [e.example_id for e in limited] == [i for i in range(61) if i not in (10, 31, 50)]


def test_builtin_ids_are_split_indices(tokenizer):
    records = load_records("builtin", "validation", 4)
    assert [i for i, _ in records] == [0, 1, 2, 3]


def test_truncation_and_drops_are_counted_and_logged(tmp_path, tokenizer, caplog):
    long_text = " ".join(["the cat runs ."] * 10)  # 41 tokens + EOS
    rows = [{"text": "the cat runs ."}, {"text": long_text}, {"prompt": long_text, "completion": " a dog"},
            {"messages": [{"role": "user", "content": "the cat"}]}, {"prompt": "the cat", "completion": " runs ."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = load_records(str(path))
    examples, stats = encode_all(tokenizer, records, 16, str(path))
    assert [e.example_id for e in examples] == [0, 1, 4]
    assert len(examples[1].input_ids) == 16
    assert (stats.kept, stats.truncated, stats.dropped_prompt_fills, stats.dropped_empty) == (3, 1, 1, 1)
    cfg = RunConfig.from_yaml(None, [f"data.train={path}", f"data.validation={path}", "data.max_length=16"], check_run=False)
    with caplog.at_level(logging.INFO, logger="potstill"):
        load_examples(cfg, tokenizer)
    assert f"data: 3 training examples from {path}; 1 truncated to 16 tokens; 1 dropped (prompt fills max_length); " \
           "1 dropped (no token to train on)" in caplog.messages
    with pytest.raises(ValueError, match=r"no example has any token to train on \(1 without a target, 1 whose prompt"):
        encode_all(tokenizer, [records[2], records[3]], 16, str(path))


def test_invalid_utf8_names_file_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_records(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')  # a BOM from a Windows editor is not an error
    assert load_records(str(path)) == [(0, {"text": "a"})]


def test_unreadable_tables_name_the_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match=r"x.parquet: cannot be read as Parquet \("):
        load_records(str(tmp_path / "x.parquet"))
    (tmp_path / "dsdir").mkdir()
    with pytest.raises(ValueError, match=r"dsdir: cannot be read as a saved datasets directory \("):
        load_records(str(tmp_path / "dsdir"))


def test_wrong_field_types_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"prompt": "q", "completion": 42}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: 'completion' must be a string, got int"):
        load_records(str(path))
