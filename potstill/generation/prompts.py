"""Prompts for `potstill generate`, from `data.train` records, and the records written for their completions.

- ``prompt``/``completion`` records → the prompt (the reference completion is dropped; other fields such as
  ``answer`` pass through to the output).
- chat ``messages`` → the conversation up to its last assistant turn (the whole conversation when it has none);
  the output appends the generated assistant turn.
- ``text`` records have no prompt and are refused.
- ``builtin:arithmetic`` → the built-in addition problems (``builtin/sources.py``, train split, the records
  ``distill`` reads), prompt/completion records with an ``answer`` for the arithmetic checker.

A prompt's id is its record's number in ``data.train`` (``data.loading``), so it names the same prompt in every
run over the same file; the output's ``(prompt_id, sample)`` pairs are what a resumed run skips.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from potstill.data.loading import load_records, record_kind, record_location
from potstill.generation.text import chat_prompt_ids

BUILTIN_ARITHMETIC = "builtin:arithmetic"
_RECORD_FIELDS = ("prompt", "completion", "messages", "prompt_id", "sample")


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    prompt: str | None = None  # prompt/completion records
    messages: list[dict] | None = None  # chat records: the conversation before the reply to generate
    extra: dict = field(default_factory=dict)  # fields passed through to the output (e.g. answer)

    def token_ids(self, tokenizer) -> list[int]:
        """The ids a local teacher continues: the prompt text with special tokens (as training encodes it), or
        the conversation through the chat template with the assistant header."""
        if self.messages is not None:
            return chat_prompt_ids(tokenizer, self.messages)
        return list(tokenizer(self.prompt, add_special_tokens=True)["input_ids"])

    def chat_messages(self) -> list[dict]:
        """What an OpenAI chat endpoint is sent: the conversation, or the prompt as one user message."""
        return self.messages if self.messages is not None else [{"role": "user", "content": self.prompt}]

    def record(self, completion: str, sample: int, as_chat: bool = False) -> dict:
        """The output line: a record `potstill distill` trains on, with the prompt's id and the sample index. A
        reply the teacher wrote to a chat conversation (``as_chat``: a prompt record sent to a chat endpoint as one
        user turn) is written as that conversation, so training reads it under the chat template it answered."""
        if self.messages is not None or as_chat:
            body = {"messages": [*self.chat_messages(), {"role": "assistant", "content": completion}]}
        else:
            body = {"prompt": self.prompt, "completion": completion}
        return {**body, "prompt_id": self.prompt_id, "sample": sample, **self.extra}


def load_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """The prompts of a data spec (a file, a datasets dir, or builtin:arithmetic), at most ``limit``."""
    if spec == "builtin":
        raise ValueError("data.train=builtin holds text documents, which have no prompt to complete; use "
                         f"data.train={BUILTIN_ARITHMETIC} or a file of prompt/completion or chat records")
    # built-in sources (builtin:arithmetic, ...) read as `distill` reads them: the same problems, the same ids
    records = load_records(spec, "train", limit)
    return [prompt_of(record, number, record_location(spec, number)) for number, record in records]


def prompt_of(record: dict, number: int, where: str) -> Prompt:
    kind = record_kind(record, where)
    extra = {k: v for k, v in record.items() if k not in _RECORD_FIELDS and k != "text"}
    if kind == "text":
        raise ValueError(f"{where}: a text record has no prompt to complete; potstill generate needs "
                         "prompt/completion records or chat messages")
    if kind == "prompt/completion":
        return Prompt(number, prompt=record["prompt"], extra=extra)
    messages = record["messages"]
    assistant_turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    before = messages[: assistant_turns[-1]] if assistant_turns else messages
    if not before:
        raise ValueError(f"{where}: the conversation has nothing before its assistant turn to answer")
    return Prompt(number, messages=[dict(m) for m in before], extra=extra)
