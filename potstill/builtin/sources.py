"""The built-in data sources a config names as `data.train` / `data.validation`: `builtin` (grammar texts),
`builtin:arithmetic` (addition with its rationale), `builtin:arithmetic-multitask` (Distilling Step-by-Step's
label + rationale tasks) and `builtin:mixed` (arithmetic and grammar texts interleaved).

Each split comes from that generator's own stream (validation from the validation stream), and a record's number
is its index in the source, so a smaller `limit` gives a prefix of a larger one. Arithmetic records keep their
`answer` (plain digits, checkable with `arithmetic.extract_answer`); multitask records also name their `task`.

Multitask prefixes: the built-in tokenizer is word-level and its vocabulary is fixed (the shipped teacher's
embeddings depend on it), so each task prefix is one word it already has: `answer` marks the label task (the
completion is just "answer <digits>") and `write` the rationale task (the full column-by-column rationale). Both
are arithmetic words already, so neither adds a token nor borrows a grammar word.
"""
from __future__ import annotations

from potstill.builtin.arithmetic import arithmetic_examples, spaced_digits
from potstill.builtin.grammar import DEFAULT_SPLIT_SIZES, builtin_texts
from potstill.registry import did_you_mean

ARITHMETIC_DIGITS = (2, 3)  # operands of 2-3 digits: rationales of at most 45 tokens with EOS
LABEL_PREFIX, RATIONALE_PREFIX = "answer", "write"  # one existing built-in token each (see the module docstring)
Record = tuple[int, dict]


def _default_size(split: str, limit: int | None) -> int:
    return DEFAULT_SPLIT_SIZES[split] if limit is None else limit


def arithmetic_records(split: str, limit: int | None = None) -> list[Record]:
    """prompt / completion (the full rationale) / answer per addition problem."""
    return list(enumerate(arithmetic_examples(split, _default_size(split, limit), digits=ARITHMETIC_DIGITS)))


def multitask_pair(problem: dict) -> list[dict]:
    """The label task and the rationale task of one problem, prompts prefixed by one task token each."""
    answer = problem["answer"]
    return [
        {"prompt": f"{LABEL_PREFIX} {problem['prompt']}", "completion": f" answer {spaced_digits(int(answer))}",
         "answer": answer, "task": "label"},
        {"prompt": f"{RATIONALE_PREFIX} {problem['prompt']}", "completion": problem["completion"],
         "answer": answer, "task": "rationale"},
    ]


def multitask_records(split: str, limit: int | None = None) -> list[Record]:
    """Two records per problem (2i = label task, 2i + 1 = rationale task): the tasks weigh equally in the data."""
    n = _default_size(split, limit)
    problems = arithmetic_examples(split, -(-n // 2), digits=ARITHMETIC_DIGITS)
    return list(enumerate(r for p in problems for r in multitask_pair(p)))[:n]


def mixed_records(split: str, limit: int | None = None) -> list[Record]:
    """Arithmetic problems (even numbers) and grammar texts (odd numbers) interleaved one to one: a model trained on
    it learns to add and keeps the built-in language, so its golden distances stay meaningful."""
    n = _default_size(split, limit)
    half = -(-n // 2)
    problems = arithmetic_examples(split, half, digits=ARITHMETIC_DIGITS)
    texts = builtin_texts(split, half)
    return list(enumerate(r for pair in zip(problems, ({"text": t} for t in texts)) for r in pair))[:n]


def text_records(split: str, limit: int | None = None) -> list[Record]:
    return [(i, {"text": t}) for i, t in enumerate(builtin_texts(split, limit))]


SOURCES = {"builtin": text_records, "builtin:arithmetic": arithmetic_records,
           "builtin:arithmetic-multitask": multitask_records, "builtin:mixed": mixed_records}


def builtin_records(spec: str, split: str = "train", limit: int | None = None) -> list[Record]:
    """Numbered records of a built-in source; an unknown name fails with the known ones."""
    if spec not in SOURCES:
        raise ValueError(f"unknown built-in data source {spec!r}.{did_you_mean(spec, SOURCES)} "
                         f"Known: {', '.join(SOURCES)}")
    return SOURCES[spec](split, limit)
