"""The built-in data: determinism, exact probabilities (brute force on a tiny HMM), sampling agrees with the
probabilities, one token per word, tokenizer round trip, and a correct addition task."""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from potstill.builtin import (
    HiddenMarkovSource, accuracy, arithmetic_examples, build_tokenizer, builtin_texts, extract_answer,
    true_token_logprobs,
)
from potstill.builtin.lexicon import grammar_vocabulary


@pytest.fixture(scope="module")
def source() -> HiddenMarkovSource:
    return HiddenMarkovSource.from_seed(0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "builtin")


def tiny_source() -> HiddenMarkovSource:
    """3 states, 3 words; "a" is emitted by two states so the hidden state is genuinely ambiguous."""
    start = [0.6, 0.4, 0.0]
    trans = [[0.1, 0.5, 0.2, 0.2], [0.3, 0.0, 0.6, 0.1], [0.25, 0.25, 0.0, 0.5]]  # last column: end
    emit = [[0.7, 0.3, 0.0], [0.5, 0.0, 0.5], [0.0, 0.2, 0.8]]
    return HiddenMarkovSource(["a", "b", "c"], np.array(start), np.array(trans), np.array(emit))


def brute_force_prefix_prob(src: HiddenMarkovSource, ids: list[int], then_end: bool) -> float:
    """P(doc starts with ids [and ends right after]) summed over every hidden path explicitly."""
    total = 0.0
    for path in itertools.product(range(src.n_states), repeat=len(ids)):
        p = src.start[path[0]] * src.emit[path[0], ids[0]]
        for prev, state, word in zip(path, path[1:], ids[1:]):
            p *= src.trans[prev, state] * src.emit[state, word]
        total += p * (src.trans[path[-1], -1] if then_end else 1.0)
    return total


def test_next_word_logprobs_match_enumeration_of_hidden_paths():
    src = tiny_source()
    for doc in (["a"], ["a", "b", "a"], ["c", "a", "a", "b"]):
        logp = src.next_word_logprobs(doc)
        assert logp.shape == (len(doc) + 1, 4)
        for i in range(len(doc) + 1):
            prefix = [src.word_index[w] for w in doc[:i]]
            denominator = brute_force_prefix_prob(src, prefix, False) if prefix else 1.0
            expected = [brute_force_prefix_prob(src, prefix + [v], False) / denominator for v in range(3)]
            expected.append(brute_force_prefix_prob(src, prefix, True) / denominator if prefix else 0.0)
            np.testing.assert_allclose(np.exp(logp[i]), expected, rtol=1e-12, atol=1e-15)
        ids = [src.word_index[w] for w in doc]
        assert src.log_likelihood(doc) == pytest.approx(math.log(brute_force_prefix_prob(src, ids, True)), rel=1e-12)


def test_constructor_rejects_bad_matrices():
    with pytest.raises(ValueError, match="shapes"):
        HiddenMarkovSource(["a"], np.ones(1), np.ones((1, 1)), np.ones((1, 1)))
    with pytest.raises(ValueError, match="sum to 1"):
        HiddenMarkovSource(["a"], np.ones(1), np.array([[0.5, 0.4]]), np.ones((1, 1)))
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_source().next_word_logprobs(["a", "zebra"])


def test_texts_are_deterministic_and_splits_differ():
    validation = builtin_texts("validation", 40)
    assert validation == builtin_texts("validation", 40)
    assert validation[:15] == builtin_texts("validation", 15)  # a smaller n is a prefix
    assert set(validation).isdisjoint(builtin_texts("test", 40))
    assert validation != builtin_texts("validation", 40, seed=1)
    assert len(builtin_texts("test")) == 500
    with pytest.raises(ValueError, match="unknown split"):
        builtin_texts("dev")


def test_rows_are_normalised_and_nll_is_a_finite_floor(source):
    docs = builtin_texts("validation", 20)
    for doc in docs[:5]:
        logp = source.next_word_logprobs(doc.split())
        assert logp.shape == (len(doc.split()) + 1, len(source.words) + 1)
        np.testing.assert_allclose(np.logaddexp.reduce(logp, axis=1), 0.0, atol=1e-9)
    nll = source.mean_true_nll(docs)
    assert 0.0 < nll < math.log(len(source.words) + 1) and math.isfinite(nll)
    words = docs[0].split()  # the per-document NLL is the sum of the rows' observed entries
    picked = source.next_word_logprobs(words)[np.arange(len(words) + 1), [source.word_index[w] for w in words] + [-1]]
    assert source.mean_true_nll(docs[:1]) == pytest.approx(-picked.mean(), rel=1e-12)


def test_sampled_frequencies_agree_with_true_probabilities(source):
    docs = source.sample_word_ids(np.random.default_rng(123), 4000)
    first = np.array([doc[0] for doc in docs])
    # After the most common first word (e.g. "the", singular or plural: an ambiguous hidden state).
    top = np.bincount(first).argmax()
    second = np.array([doc[1] for doc in docs if doc[0] == top])
    for context, observed in (([], first), ([source.words[top]], second)):
        true_p = np.exp(source.next_word_logprobs(context)[len(context), :-1])
        freq = np.bincount(observed, minlength=len(source.words)) / len(observed)
        tolerance = 5 * np.sqrt(true_p * (1 - true_p) / len(observed)) + 2e-3
        assert np.all(np.abs(freq - true_p) <= tolerance)


def test_verbs_agree_with_the_subject_across_a_prepositional_phrase(source):
    def logp_next(words: list[str], word: str) -> float:
        return source.next_word_logprobs(words)[-1, source.word_index[word]]

    assert logp_next("the cat".split(), "sleeps") > -np.inf and logp_next("the cat".split(), "sleep") == -np.inf
    assert logp_next("the cats near the tree".split(), "sleep") > -np.inf
    assert logp_next("the cats near the tree".split(), "sleeps") == -np.inf
    assert source.next_word_logprobs(["the", "cat", "sleeps", "."])[-1, -1] == -np.inf  # >= 4 sentences


def test_every_word_is_one_known_token(source, tokenizer):
    assert source.words == grammar_vocabulary()
    for text in builtin_texts("train", 200):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.convert_ids_to_tokens(ids[1:]) == text.split()


def test_tokenizer_round_trips_through_save_and_auto_load(tmp_path, tokenizer):
    out_dir = tmp_path / "tok"
    built = build_tokenizer(out_dir)
    rebuilt = build_tokenizer(out_dir)  # replacing an existing directory works and leaves no temp dirs
    assert os.listdir(tmp_path) == ["tok"]
    loaded = AutoTokenizer.from_pretrained(out_dir)
    assert loaded.get_vocab() == built.get_vocab() == rebuilt.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    text = "what is 1 2 + 3 ?"
    assert loaded(text)["input_ids"] == built(text)["input_ids"] and loaded(text)["input_ids"][-1] != 2
    chat = [{"role": "user", "content": text}, {"role": "assistant", "content": "answer 1 5"}]
    rendered = loaded.apply_chat_template(chat, tokenize=False)
    assert rendered.split() == ["user", ":", *text.split(), "assistant", ":", "answer", "1", "5", "</s>"]
    assert loaded.unk_token_id not in loaded(rendered)["input_ids"]


def test_true_token_logprobs_shape_and_normalisation(source, tokenizer):
    text = builtin_texts("test", 1)[0]
    logp = true_token_logprobs(tokenizer, source, text, dtype=torch.float64)
    targets = torch.tensor(tokenizer(text)["input_ids"][1:] + [tokenizer.eos_token_id])
    assert logp.shape == (len(text.split()) + 1, len(tokenizer))
    torch.testing.assert_close(torch.logsumexp(logp, -1), torch.zeros(len(targets), dtype=torch.float64))
    assert logp[0, tokenizer.bos_token_id] == -math.inf and logp[-1, tokenizer.eos_token_id] > -math.inf
    observed = logp[torch.arange(len(targets)), targets].sum().item()
    assert observed == pytest.approx(source.log_likelihood(text.split()), rel=1e-12)


def test_arithmetic_answers_are_correct_and_extractable():
    examples = arithmetic_examples("train", 300, digits=(1, 5))
    assert examples == arithmetic_examples("train", 300, digits=(1, 5))
    assert examples[:50] != arithmetic_examples("test", 50, digits=(1, 5))
    for example in examples:
        a, b = example["prompt"].removeprefix("what is ").removesuffix(" ?").replace(" ", "").split("+")
        assert example["answer"] == str(int(a) + int(b))
        assert extract_answer(example["completion"]) == example["answer"]
    completions, answers = [e["completion"] for e in examples], [e["answer"] for e in examples]
    assert accuracy(completions, answers) == 1.0
    assert accuracy(["answer 1 2 </s>", "no idea"], ["12", "3"]) == 0.5
    assert extract_answer("7 + 5 + 0 = 1 2") is None
    assert len(arithmetic_examples("validation", 1, digits=(3, 3))[0]["prompt"].split()) == 10  # what is d d d + d d d ?


def test_arithmetic_tokens_are_covered(tokenizer):
    for example in arithmetic_examples("validation", 50):
        ids = tokenizer(example["prompt"] + example["completion"])["input_ids"]  # one text, as the data layer reads it
        assert tokenizer.unk_token_id not in ids
