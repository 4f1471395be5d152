"""Records → token ids and loss labels (HF convention: labels aligned with input_ids, -100 = no loss).

- ``text``: every token is trained on; EOS is appended so the student learns where documents end.
- ``prompt``/``completion``: loss on the completion (and its EOS) only.
- ``messages``: rendered with the tokenizer's chat template; loss on assistant turns only. Assistant spans are
  found by rendering the conversation up to each turn, which works for any template whose renderings of a
  conversation's prefixes are prefixes of each other (checked, with a clear error otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

from potstill.data.loading import record_kind
from potstill.labels import IGNORE_INDEX


@dataclass
class Example:
    example_id: int
    input_ids: list[int]
    labels: list[int]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_text(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    ids = _with_eos(tokenizer, _ids(tokenizer, record["text"], True))
    return ids, list(ids)


def encode_prompt_completion(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    prompt = _ids(tokenizer, record["prompt"], True)
    completion = _with_eos(tokenizer, _ids(tokenizer, record["completion"], False))
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def encode_messages(tokenizer, record: dict, where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat 'messages' need a tokenizer with a chat_template; this one has none")
    messages = record["messages"]
    ids: list[int] = []
    labels: list[int] = []

    def extend(rendered: str, trained: bool) -> None:
        new_ids = _ids(tokenizer, rendered, False)
        if new_ids[: len(ids)] != ids:
            raise ValueError(f"{where}: the chat template does not render conversation prefixes consistently, "
                             "so assistant tokens cannot be located; use prompt/completion records instead")
        new = new_ids[len(ids):]
        ids.extend(new)
        labels.extend(new if trained else [IGNORE_INDEX] * len(new))

    for turn, message in enumerate(messages):
        assistant = message.get("role") == "assistant"
        if assistant:  # the assistant header ("<|im_start|>assistant\n") is prompt, not a trained token
            extend(tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True), False)
        extend(tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False), assistant)
    return ids, labels


def encode_record(tokenizer, record: dict, example_id: int, max_length: int, where: str) -> Example:
    kind = record_kind(record, where)
    if kind == "messages":
        ids, labels = encode_messages(tokenizer, record, where)
    elif kind == "prompt/completion":
        ids, labels = encode_prompt_completion(tokenizer, record)
    else:
        ids, labels = encode_text(tokenizer, record)
    return Example(example_id, ids[:max_length], labels[:max_length])


def encode_all(tokenizer, records: list[dict], max_length: int, source: str) -> list[Example]:
    """Encode every record; examples with nothing to learn (no label after the first position) are dropped."""
    examples = [encode_record(tokenizer, r, i, max_length, f"{source}: record {i}") for i, r in enumerate(records)]
    kept = [e for e in examples if any(lab != IGNORE_INDEX for lab in e.labels[1:])]
    if not kept:
        raise ValueError(f"{source}: no example has any token to train on (all empty, or prompts fill max_length)")
    return kept
