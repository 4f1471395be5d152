"""Log-probabilities in the two OpenAI wire formats.

Completions (legacy, as vLLM returns them): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
one entry per listed token; a sequence's first token has no log-probability (null), and each ``top_logprobs``
dict holds the k most likely tokens plus the listed token when it is not among them (vLLM's rule, so a client
always finds it); ``text_offset`` is the running sum of the token strings' lengths (vLLM's definition).
Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}``.
"""
from __future__ import annotations

from potstill.generation.text import token_strings
from potstill.serving.engine import Scores


def completion_logprobs(tokenizer, ids: list[int], start: int, scores: Scores, as_ids: bool) -> dict:
    """Entries for ``ids[start:]`` of a scored sequence ``ids``."""
    listed = ids[start:]
    strings = token_strings(tokenizer, listed, as_ids)
    lengths = [len(text) for text in token_strings(tokenizer, listed)]  # offsets count decoded text, not "token_id:"
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict | None] = []
    offsets, offset = [], 0
    for position, (token, length) in enumerate(zip(listed, lengths), start):
        offsets.append(offset)
        offset += length
        if position == 0:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        chosen, top = scores.chosen[position - 1], scores.top[position - 1]
        if token not in {i for i, _ in top}:
            top = [*top, (token, chosen)]
        keys = token_strings(tokenizer, [i for i, _ in top], as_ids)
        token_logprobs.append(chosen)
        top_logprobs.append({key: lp for key, (_, lp) in zip(keys, top)})
    return {"tokens": strings, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, ids: list[int], start: int, scores: Scores) -> dict:
    """Entries for the generated tokens ``ids[start:]`` (start ≥ 1: a chat prompt is never empty)."""
    content = []
    for position in range(start, len(ids)):
        top = scores.top[position - 1]
        top_text = token_strings(tokenizer, [i for i, _ in top])
        entry = _chat_entry(tokenizer.decode([ids[position]]), scores.chosen[position - 1])
        entry["top_logprobs"] = [_chat_entry(t, lp) for t, (_, lp) in zip(top_text, top)]
        content.append(entry)
    return {"content": content, "refusal": None}
