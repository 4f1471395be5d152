"""The built-in default data: an offline, deterministic, license-clean English-like language with exactly
known next-token probabilities, a checkable addition task, and a word-level tokenizer covering both."""
from __future__ import annotations

from potstill.builtin.arithmetic import accuracy, addition_rationale, arithmetic_examples, extract_answer
from potstill.builtin.grammar import SPLITS, HiddenMarkovSource, builtin_texts
from potstill.builtin.tokenizer import build_tokenizer, builtin_vocabulary, true_token_logprobs

__all__ = [
    "SPLITS", "HiddenMarkovSource", "accuracy", "addition_rationale", "arithmetic_examples", "build_tokenizer",
    "builtin_texts", "builtin_vocabulary", "extract_answer", "true_token_logprobs",
]
