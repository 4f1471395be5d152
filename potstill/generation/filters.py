"""Which generated completions `potstill generate` keeps. Each rejection has a reason, counted in the summary and
recorded in OUT.rejected.jsonl:

- ``unfinished``: cut at max_new_tokens without an EOS (unless generate.keep_unfinished);
- ``too_short`` / ``too_long``: fewer than generate.min_tokens / more than generate.max_tokens generated tokens
  (EOS included, as the backend counts them);
- ``checker``: the task's checker rejects it (arithmetic: the extracted answer differs from the record's);
- ``duplicate``: the same text as a completion already kept for this prompt (generate.dedup);
- ``prompt_too_long``: the prompt leaves no room for max_new_tokens in the model's context (local backend).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from potstill.generation.prompts import Prompt

CHECKERS = ("none", "arithmetic")


@dataclass
class Completion:
    prompt_id: int
    sample: int
    text: str
    tokens: int  # generated tokens, EOS included
    finished: bool  # ended by EOS (or a stop), not by max_new_tokens


def _arithmetic(prompt: Prompt, text: str) -> bool:
    from potstill.builtin.arithmetic import extract_answer

    return extract_answer(text) == str(prompt.extra["answer"]).strip()


def checker(name: str, prompts: list[Prompt]) -> Callable[[Prompt, str], bool] | None:
    """The checker function, after making sure every prompt carries what it needs."""
    if name not in CHECKERS:
        raise ValueError(f"generate.checker={name!r}: use one of {', '.join(CHECKERS)}")
    if name == "none":
        return None
    missing = next((p.prompt_id for p in prompts if "answer" not in p.extra), None)
    if missing is not None:
        raise ValueError(f"generate.checker=arithmetic needs an 'answer' field in every record; record {missing} "
                         "of data.train has none")
    return _arithmetic


class Filters:
    def __init__(self, g, prompts: list[Prompt]):  # g: config.GenerateConfig
        self.check = checker(g.checker, prompts)
        self.dedup, self.keep_unfinished = g.dedup, g.keep_unfinished
        self.min_tokens, self.max_tokens = g.min_tokens, g.max_tokens

    def reason(self, prompt: Prompt, completion: Completion, kept: set[str]) -> str | None:
        """Why ``completion`` is dropped (None = keep); ``kept`` holds this prompt's completions kept so far."""
        if not completion.finished and not self.keep_unfinished:
            return "unfinished"
        if completion.tokens < self.min_tokens:
            return "too_short"
        if self.max_tokens is not None and completion.tokens > self.max_tokens:
            return "too_long"
        if self.check is not None and not self.check(prompt, completion.text):
            return "checker"
        if self.dedup and completion.text in kept:
            return "duplicate"
        return None
