"""Token ids ↔ text for generated completions, shared by `potstill generate` (local backend) and `potstill serve`.

A completion's text is the decoded continuation *as it reads after its prompt*: ``decode(prompt + new)`` minus
``decode(prompt)``. Decoding the new tokens alone is wrong for tokenizers whose decoder depends on context (a
word-level tokenizer joins words with spaces, so the continuation starts with one; SentencePiece drops a leading
space at the start of a text), and the generated data is trained on as ``prompt + completion`` re-tokenised.
"""
from __future__ import annotations


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config's EOS id(s)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("the model and its tokenizer define no EOS token, so no completion could ever finish")
    return sorted(ids)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation rendered with the tokenizer's chat template plus the assistant header, as token ids. The
    template writes any BOS itself (no special tokens added), exactly as chat records are encoded for training."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def without_eos(tokens: list[int], finished: bool) -> list[int]:
    """The content tokens of a completion: a finished one ends with its EOS token, which is not text."""
    return tokens[:-1] if finished and tokens else tokens


def completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt (special tokens skipped)."""
    if not new_ids:
        return ""
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    after = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if after.startswith(before):
        return after[len(before):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)  # a decoder that rewrites the prompt's end


def token_strings(tokenizer, ids: list[int], as_ids: bool = False) -> list[str]:
    """One display string per token: each token decoded alone (special tokens kept), or ``token_id:<id>`` (vLLM's
    ``return_tokens_as_token_ids``, exact where two ids decode to the same text)."""
    if as_ids:
        return [f"token_id:{i}" for i in ids]
    return [tokenizer.decode([i]) for i in ids]
