"""Before step 1 of an on-policy run: the student must be able to stop. Its generation EOS ids (generation_config,
else config, else tokenizer — or `onpolicy.eos_tokens`) must be tokens of the shared vocabulary, and the data's
completions must end with one of them (a chat template whose assistant turn ends with another token would teach
the student an end it never stops at)."""
from __future__ import annotations

from potstill.data.encode import Example
from potstill.labels import IGNORE_INDEX


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def student_eos_ids(student, tokenizer) -> tuple[list[int], str]:
    """(ids, where they came from) of the student's own end-of-generation tokens."""
    for where, obj in (("generation_config", getattr(student, "generation_config", None)),
                       ("config", getattr(student, "config", None)), ("tokenizer", tokenizer)):
        ids = _as_list(getattr(obj, "eos_token_id", None))
        if ids:
            return ids, f"the student's {where}"
    raise ValueError("data.regime=onpolicy: the student has no EOS token (generation_config, config and tokenizer "
                     "name none), so rollouts could never stop; set onpolicy.eos_tokens: [ID]")


def configured_eos_ids(eos_tokens: list, tokenizer) -> list[int]:
    """`onpolicy.eos_tokens` as ids: ints are ids, strings are tokens of the vocabulary."""
    vocab = tokenizer.get_vocab()
    ids = []
    for token in eos_tokens:
        if isinstance(token, str):
            if token not in vocab:
                raise ValueError(f"onpolicy.eos_tokens: {token!r} is not a token of the tokenizer's vocabulary")
            token = vocab[token]
        ids.append(int(token))
    return ids


def _name(tokenizer, token_id: int) -> str:
    return f"{token_id} ({tokenizer.convert_ids_to_tokens(token_id)!r})"


def completion_ends(examples: list[Example], max_length: int) -> dict[int, int]:
    """{last token of the first labelled span: how many examples end their completion with it}, over examples that
    were not cut by max_length (a rollout stops where the first trained span — the first assistant turn — ends)."""
    ends: dict[int, int] = {}
    for e in examples:
        labelled = [i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX and i > 0]
        if not labelled or len(e.input_ids) >= max_length:
            continue
        last = labelled[0]
        while last + 1 < len(e.labels) and e.labels[last + 1] != IGNORE_INDEX:
            last += 1
        ends[e.labels[last]] = ends.get(e.labels[last], 0) + 1
    return ends


def resolve_eos_ids(cfg, student, tokenizer, vocab: int, examples: list[Example]) -> list[int]:
    """The ids that end a rollout, after every check (one line naming both sides on a mismatch)."""
    if cfg.onpolicy.eos_tokens is not None:
        ids, where = configured_eos_ids(cfg.onpolicy.eos_tokens, tokenizer), "onpolicy.eos_tokens"
    else:
        ids, where = student_eos_ids(student, tokenizer)
    outside = [i for i in ids if not 0 <= i < vocab]
    if outside:
        raise ValueError(f"data.regime=onpolicy: EOS id(s) {outside} from {where} are outside the shared vocabulary "
                         f"of {vocab} tokens; set onpolicy.eos_tokens to the token the completions end with")
    # No completion fits max_length: the token encoding appends to text and prompt/completion records stands in.
    ends = completion_ends(examples, cfg.data.max_length) or {tokenizer.eos_token_id: len(examples)}
    foreign = {t: n for t, n in ends.items() if t not in ids}
    if foreign:
        token, count = max(foreign.items(), key=lambda kv: kv[1])
        raise ValueError(f"data.regime=onpolicy: {count} of the data's completions end with token {_name(tokenizer, token)}, "
                         f"but the student stops at {', '.join(_name(tokenizer, i) for i in ids)} (from {where}); "
                         f"the student would never learn to stop — set onpolicy.eos_tokens: [{token}] (or fix the chat "
                         "template / generation_config)")
    return ids
