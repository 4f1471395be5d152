"""Bits per byte: held-out negative log-likelihood in bits per UTF-8 byte of the text the labelled tokens spell,
the one loss number that is comparable across tokenizers (docs/cross-tokenizer.md, "Bits per byte").

    bpb = Σ_labelled −ln q(y_t) / (ln 2 · Σ_labelled bytes(y_t))

What a token's bytes are (``token_bytes``): a token that holds text owns the bytes from the previous such token's
end to its own end, so the whitespace before it is its own whatever the tokenizer does with spaces ("Ġcat",
"▁cat", or a word-level tokenizer that drops them); the last one also owns the bytes after it. Inserted special
tokens (BOS, an appended EOS) and a token holding only part of a character (the character goes to the token that
completes it, ``crosstok.byte_spans``) own 0 bytes. Only bytes from ``region_start`` on count, so for a
prompt/completion record (region = the completion) the labelled tokens' bytes sum to exactly the completion's
UTF-8 length, even when a token merges across the prompt boundary; for a text record to the text's length.

Byte counts are attached to held-out examples once (``attach_token_bytes``: ``Example.extra["token_bytes"]``, on
every example or on none), collated as the batch key ``token_bytes`` (B, T) and summed by ``evaluate`` over the
same positions as the NLL (padding is never a labelled position).
"""
from __future__ import annotations

import math

from potstill.crosstok.alignment import TokenSpans, byte_spans
from potstill.data.encode import Example
from potstill.data.loading import Record, record_kind, record_location
from potstill.labels import IGNORE_INDEX

LN2 = math.log(2.0)
TOKEN_BYTES = "token_bytes"  # the Example.extra list and the batch key


def token_bytes(spans: TokenSpans, region_start: int = 0) -> list[int]:
    """Per token, the bytes of ``spans.text`` at or after ``region_start`` it stands for (rule: module doc)."""
    owned = [0] * len(spans)
    holders = [i for i in range(len(spans)) if not spans.special[i] and spans.ends[i] > spans.starts[i]]
    previous = 0
    for k, i in enumerate(holders):
        end = spans.n_bytes if k == len(holders) - 1 else spans.ends[i]
        owned[i] = max(0, end - max(previous, region_start))  # |[previous, end) ∩ [region_start, ∞)|
        previous = end
    return owned


def record_text(tokenizer, record: dict, where: str) -> tuple[str, int]:
    """The text a record is encoded from (``data.encode``) and the byte where its trained part starts."""
    kind = record_kind(record, where)
    if kind == "messages":  # the rendered conversation; only the assistant tokens are labelled anyway
        return tokenizer.apply_chat_template(record["messages"], tokenize=False), 0
    if kind == "prompt/completion":
        return record["prompt"] + record["completion"], len(record["prompt"].encode("utf-8"))
    return record["text"], 0


def example_token_bytes(tokenizer, record: dict, example: Example, where: str) -> list[int] | None:
    """Bytes per token of ``example`` (encoded from ``record``), or None when its tokens are not the text's
    tokenisation (plus an appended EOS, minus truncation), so that no byte count is ever guessed."""
    text, region = record_text(tokenizer, record, where)
    try:
        spans = byte_spans(tokenizer, text)
    except ValueError:  # offsets that go backwards: no byte attribution
        return None
    ids, owned = list(spans.ids), token_bytes(spans, region)
    if ids and spans.special[0] and example.input_ids[:1] != ids[:1]:  # rendered without the post-processor's BOS
        ids, owned = ids[1:], owned[1:]
    n = len(example.input_ids)
    appended = example.input_ids[len(ids):]
    if example.input_ids[: len(ids)] != ids[:n] or appended not in ([], [tokenizer.eos_token_id]):
        return None
    return (owned + [0] * len(appended))[:n]


def attach_token_bytes(tokenizer, examples: list[Example], records: list[Record], source: str) -> bool:
    """Set ``extra["token_bytes"]`` on every example, or on none when one of them cannot be exact (then no bits per
    byte is reported rather than one over part of the data; likewise for a tokenizer without offsets). ``records``:
    the numbered records the examples were encoded from. Returns whether the counts were attached."""
    if not getattr(tokenizer, "is_fast", False):
        return False
    by_number = dict(records)
    counts = [example_token_bytes(tokenizer, by_number[e.example_id], e, record_location(source, e.example_id))
              for e in examples]
    if any(c is None for c in counts):
        return False
    for e, c in zip(examples, counts):
        e.extra[TOKEN_BYTES] = c
    return True


def labelled_bytes(example: Example) -> int | None:
    """Σ bytes of the tokens the example's labels score (labels[1:], as evaluation), None without byte counts."""
    counts = example.extra.get(TOKEN_BYTES)
    if counts is None:
        return None
    return sum(b for b, label in zip(counts[1:], example.labels[1:]) if label != IGNORE_INDEX)


def same_bytes_problem(student: list[Example], teacher: list[Example]) -> str | None:
    """Why the two tokenisations' held-out examples do not score the same bytes (so their bpb would not compare),
    or None: other examples kept, no byte counts, or an example whose labelled bytes differ (cut at another byte by
    data.max_length, which counts tokens)."""
    if [e.example_id for e in student] != [e.example_id for e in teacher]:
        return "the two tokenizers keep different held-out examples"
    for s, t in zip(student, teacher):
        if labelled_bytes(s) is None or labelled_bytes(t) is None:
            return "a tokenizer gives no exact byte counts"
        if labelled_bytes(s) != labelled_bytes(t):
            return (f"held-out example {s.example_id} is cut at another byte ({labelled_bytes(s)} vs {labelled_bytes(t)} "
                    "labelled bytes): raise data.max_length so that neither side truncates it")
    return None


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Total NLL in nats over ``n_bytes`` bytes → bits per byte (NaN for no bytes)."""
    return nll_nats / (LN2 * n_bytes) if n_bytes > 0 else float("nan")
