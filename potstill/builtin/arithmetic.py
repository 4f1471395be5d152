"""Multi-digit addition with a checkable, step-by-step rationale (a small reasoning task for distillation).

Token scheme (every token is separated by one space, so a word-level tokenizer covers it):
numbers are written digit by digit, most significant first ("347" -> "3 4 7"); the rationale works column by
column from the ones digit, always in the same shape, with a missing digit written as 0:

    prompt:     what is 3 4 7 + 8 5 ?
    completion:  7 + 5 + 0 = 1 2 , write 2 carry 1 ; 4 + 8 + 1 = 1 3 , write 3 carry 1 ;
                3 + 0 + 1 = 4 , write 4 carry 0 ; answer 4 3 2
    answer:     432        (plain digits, compare with `extract_answer(completion)`)

Each column is "<digit of a> + <digit of b> + <carry in> = <sum digits> , write <digit> carry <carry out>".
"""
from __future__ import annotations

import numpy as np

from potstill.builtin.grammar import DEFAULT_SPLIT_SIZES, split_seed_sequence

ARITHMETIC_TOKENS = [*"0123456789", "+", "=", ",", ";", "?", "what", "is", "write", "carry", "answer"]
_ARITHMETIC_STREAM = 1  # spawn-key prefix, distinct from the grammar's


def spaced_digits(number: int) -> str:
    """347 -> "3 4 7"."""
    return " ".join(str(number))


def addition_rationale(a: int, b: int) -> str:
    """The column-by-column completion for a + b, ending in "answer <digits>"."""
    if a < 0 or b < 0:
        raise ValueError(f"only non-negative numbers are supported, got {a} and {b}")
    a_digits, b_digits = str(a)[::-1], str(b)[::-1]  # ones digit first
    steps, carry = [], 0
    for column in range(max(len(a_digits), len(b_digits))):
        x = int(a_digits[column]) if column < len(a_digits) else 0
        y = int(b_digits[column]) if column < len(b_digits) else 0
        total = x + y + carry
        steps.append(f"{x} + {y} + {carry} = {spaced_digits(total)} , write {total % 10} carry {total // 10}")
        carry = total // 10
    return " ; ".join(steps) + f" ; answer {spaced_digits(a + b)}"


def _random_number(rng: np.random.Generator, digits: tuple[int, int]) -> int:
    """A number whose digit count is uniform in [low, high] and whose leading digit is not 0 (unless 1 digit)."""
    low, high = digits
    n_digits = low + int(rng.random() * (high - low + 1))
    lowest = 0 if n_digits == 1 else 10 ** (n_digits - 1)
    return lowest + int(rng.random() * (10**n_digits - lowest))


def arithmetic_examples(
    split: str, n: int | None = None, seed: int = 0, digits: tuple[int, int] = (2, 4)
) -> list[dict[str, str]]:
    """n addition problems `{"prompt", "completion", "answer"}`, deterministic per (split, seed, digits).

    Only `Generator.random` is drawn (a numpy-version-stable stream); splits use independent streams.
    n=None gives the split's default size (train 20000, validation/test 500).
    """
    low, high = digits
    if not 1 <= low <= high:
        raise ValueError(f"digits must be (low, high) with 1 <= low <= high, got {digits}")
    n = DEFAULT_SPLIT_SIZES.get(split, 0) if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.Generator(np.random.PCG64(split_seed_sequence(seed, split, _ARITHMETIC_STREAM)))
    examples = []
    for _ in range(n):
        a, b = _random_number(rng, digits), _random_number(rng, digits)
        examples.append({
            "prompt": f"what is {spaced_digits(a)} + {spaced_digits(b)} ?",
            # a leading space: prompt and completion are tokenised as one text, and the word-level tokenizer
            # splits on whitespace only ("?7" would be one unknown word)
            "completion": " " + addition_rationale(a, b),
            "answer": str(a + b),
        })
    return examples


def extract_answer(completion: str) -> str | None:
    """The digits after the last "answer" token, joined ("answer 4 3 2 </s>" -> "432"); None if there are none."""
    tokens = completion.split()
    if "answer" not in tokens:
        return None
    after = tokens[len(tokens) - tokens[::-1].index("answer"):]
    digits = []
    for token in after:
        if not (token.isascii() and token.isdigit()):
            break
        digits.append(token)
    return "".join(digits) or None


def accuracy(completions: list[str], answers: list[str]) -> float:
    """Fraction of completions whose extracted answer equals the reference answer (compared as strings)."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if not completions:
        raise ValueError("accuracy of zero completions is undefined")
    hits = sum(extract_answer(c) == str(a).strip() for c, a in zip(completions, answers))
    return hits / len(completions)
