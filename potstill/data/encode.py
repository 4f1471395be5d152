"""Records → token ids and loss labels (HF convention: labels aligned with input_ids, -100 = no loss).

- ``text``: every token is trained on; EOS is appended so the student learns where documents end.
- ``prompt``/``completion``: ``prompt + completion`` is tokenised as one string (the tokens the model sees when it
  reads that text), loss on the completion and its EOS only. The prompt covers the first
  ``len(tokenizer(prompt))`` tokens when those ids are a prefix of the joint ids; when a token merges across the
  boundary they are not, and the rule is then by character offsets: tokens lying wholly inside the prompt are
  masked, the first token reaching past the prompt's last character (the merged one) and all after it are trained,
  so no completion character goes untrained. Without offsets (slow tokenizers) such a record is refused.
- ``messages``: rendered with the tokenizer's chat template; loss on assistant turns only. A template with
  ``{% generation %}`` blocks marks the assistant tokens itself (``return_assistant_tokens_mask``); otherwise
  assistant spans are found by rendering the conversation up to each turn, which works for any template whose
  renderings of a conversation's prefixes are prefixes of each other (checked, with a clear error otherwise).

Examples keep their record's number as ``example_id`` (see ``loading``). ``encode_all`` counts what truncation to
``max_length`` did and which examples it dropped (``EncodeStats``), so neither is silent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from potstill.data.loading import Record, record_kind, record_location
from potstill.labels import IGNORE_INDEX


# Record fields evaluation needs beyond the tokens (the checker's answer, the prompt to generate from, the task of a
# multitask record); kept only on records that have an ``answer``.
TASK_FIELDS = ("prompt", "answer", "task")


@dataclass
class Example:
    example_id: int
    input_ids: list[int]
    labels: list[int]
    privileged_ids: list[int] | None = None  # a record's `privileged_context`, for the teacher only (onpolicy/self_distill.py)
    fields: dict[str, str] = field(default_factory=dict)  # TASK_FIELDS of a checkable record, else empty
    # per-example int lists an ``annotate`` hook adds (cross-tokenizer alignment: crosstok/batches.py), collated
    # into batch keys of the same names (padded with -1)
    extra: dict[str, list[int]] = field(default_factory=dict)


def task_fields(record: dict) -> dict[str, str]:
    """The record's TASK_FIELDS when it carries an ``answer`` (a prompt/completion record), else {}."""
    if "answer" not in record or "prompt" not in record:
        return {}
    return {k: str(record[k]) for k in TASK_FIELDS if k in record}


@dataclass
class EncodeStats:
    """What encoding a data source did: kept examples, how many of them were cut, and the ones dropped."""
    source: str
    max_length: int
    kept: int = 0
    truncated: int = 0  # kept, but cut to max_length
    dropped_prompt_fills: int = 0  # had tokens to train on, none left after truncation
    dropped_empty: int = 0  # no token to train on at all (e.g. a conversation without an assistant turn)

    def summary(self, what: str = "training") -> str:
        return (f"data: {self.kept} {what} examples from {self.source}; {self.truncated} truncated to "
                f"{self.max_length} tokens; {self.dropped_prompt_fills} dropped (prompt fills max_length); "
                f"{self.dropped_empty} dropped (no token to train on)")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_text(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    ids = _with_eos(tokenizer, _ids(tokenizer, record["text"], True))
    return ids, list(ids)


def _prompt_token_count(tokenizer, prompt: str, joint, where: str) -> int:
    """How many leading tokens of the joint encoding are prompt (see the module docstring for the rule)."""
    ids = joint["input_ids"]
    prompt_ids = _ids(tokenizer, prompt, True)
    if ids[: len(prompt_ids)] == prompt_ids:
        return len(prompt_ids)
    offsets = joint.get("offset_mapping")
    if offsets is None:
        raise ValueError(f"{where}: the prompt's last token merges with the completion's first, and this tokenizer "
                         "gives no character offsets to place the boundary; use a fast tokenizer, or end the "
                         "prompt where a token ends (e.g. move a trailing space into the completion)")
    return next((i for i, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))


def encode_prompt_completion(tokenizer, record: dict, where: str) -> tuple[list[int], list[int]]:
    prompt = record["prompt"]
    joint = tokenizer(prompt + record["completion"], add_special_tokens=True,
                      return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    n_prompt = _prompt_token_count(tokenizer, prompt, joint, where)
    ids = _with_eos(tokenizer, list(joint["input_ids"]))
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _assistant_mask_encoding(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]] | None:
    """(ids, labels) from the template's own assistant mask, or None when the template marks no assistant token
    (no ``{% generation %}`` block, or one that does not cover this conversation)."""
    if not getattr(tokenizer, "is_fast", False) or not _GENERATION_BLOCK.search(str(tokenizer.chat_template)):
        return None
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        return None
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def _prefix_rendering_encoding(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Assistant spans located by rendering the conversation up to each turn (any prefix-consistent template)."""
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


def encode_messages(tokenizer, record: dict, where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat 'messages' need a tokenizer with a chat_template; this one has none")
    messages = record["messages"]
    return _assistant_mask_encoding(tokenizer, messages) or _prefix_rendering_encoding(tokenizer, messages, where)


def encode_record(tokenizer, record: dict, where: str) -> tuple[list[int], list[int]]:
    """Untruncated (input_ids, labels) of one record."""
    kind = record_kind(record, where)
    if kind == "messages":
        return encode_messages(tokenizer, record, where)
    if kind == "prompt/completion":
        return encode_prompt_completion(tokenizer, record, where)
    return encode_text(tokenizer, record)


def privileged_ids(tokenizer, record: dict, where: str) -> list[int] | None:
    """A record's optional ``privileged_context`` (text only the teacher reads, e.g. a reference solution) as ids,
    without special tokens; None when the record has none."""
    context = record.get("privileged_context")
    if context is None:
        return None
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'privileged_context' must be a string, got {type(context).__name__}")
    return _ids(tokenizer, context, False)


def _has_target(labels: list[int]) -> bool:
    """A label after the first position (the first token is never predicted)."""
    return any(lab != IGNORE_INDEX for lab in labels[1:])


def encode_all(tokenizer, records: list[Record], max_length: int, source: str,
               annotate=None) -> tuple[list[Example], EncodeStats]:
    """Encode numbered records, truncating to ``max_length``; examples with nothing to learn are dropped (their ids
    stay unused) and counted, like the truncated ones. ``annotate(record, ids, labels, where)`` (truncated ids and
    labels) may add per-example lists (``Example.extra``)."""
    stats = EncodeStats(source, max_length)
    kept = []
    for number, record in records:
        ids, labels = encode_record(tokenizer, record, record_location(source, number))
        if not _has_target(labels):
            stats.dropped_empty += 1
        elif not _has_target(labels[:max_length]):
            stats.dropped_prompt_fills += 1
        else:
            stats.truncated += len(ids) > max_length
            where = record_location(source, number)
            ids, labels = ids[:max_length], labels[:max_length]
            extra = annotate(record, ids, labels, where) if annotate is not None else {}
            kept.append(Example(number, ids, labels, privileged_ids(tokenizer, record, where), task_fields(record), extra))
    stats.kept = len(kept)
    if not kept:
        raise ValueError(f"{source}: no example has any token to train on ({stats.dropped_empty} without a target, "
                         f"{stats.dropped_prompt_fills} whose prompt fills data.max_length={max_length})")
    return kept, stats
