"""Checks that run before step 1: token-level KD is only meaningful when teacher and student share a tokenizer
and their output rows mean the same tokens. Silent mismatches here train the wrong objective without an error."""
from __future__ import annotations

import logging

from potstill.models import output_size

log = logging.getLogger("potstill")

_SPECIALS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class TokenizerMismatch(ValueError):
    pass


def _sample(keys: set[str], n: int = 5) -> str:
    return ", ".join(repr(k) for k in sorted(keys)[:n]) + (" ..." if len(keys) > n else "")


# Always probed, besides the run's own texts: words, digits, punctuation, whitespace runs, non-ASCII.
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog. 12345 + 678 = ?", "  two  spaces\tand a tab\nnew line",
               "café naïve 日本語 emoji 🙂")


def _first_difference(teacher_tok, student_tok, probes, names: tuple[str, str]) -> str | None:
    """Same vocabulary is not enough: the same text must become the same ids (pre-tokenizer, normaliser, BOS)."""
    for text in list(probes) + list(PROBE_TEXTS):
        a, b = teacher_tok(text)["input_ids"], student_tok(text)["input_ids"]
        if a != b:
            return f"they tokenize {text[:60]!r} differently ({names[0]} {a[:12]}, {names[1]} {b[:12]})"
    return None


def compare_tokenizers(teacher_tok, student_tok, probes: tuple[str, ...] | list[str] = (),
                       names: tuple[str, str] = ("teacher", "student")) -> list[str]:
    """Human-readable differences that make token-level KD wrong (empty list = compatible). ``probes`` are texts
    (e.g. a few training records) that both must encode to the same ids; ``names`` call the two sides in the
    messages (a draft check says target/draft)."""
    first, second = names
    problems = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t, only_s = set(tv) - set(sv), set(sv) - set(tv)
        moved = {k for k in set(tv) & set(sv) if tv[k] != sv[k]}
        detail = [f"{len(only_t)} tokens only in the {first}'s ({_sample(only_t)})" if only_t else "",
                  f"{len(only_s)} only in the {second}'s ({_sample(only_s)})" if only_s else "",
                  f"{len(moved)} with different ids ({_sample(moved)})" if moved else ""]
        problems.append(f"vocabularies differ ({len(tv)} vs {len(sv)} tokens): " + "; ".join(d for d in detail if d))
    for name in _SPECIALS:
        t, s = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if name == "eos_token_id" and t != s or (name != "eos_token_id" and t is not None and s is not None and t != s):
            problems.append(f"{name} differs: {first} {t}, {second} {s}")
    behaviour = None if problems else _first_difference(teacher_tok, student_tok, probes, names)
    return problems + ([behaviour] if behaviour else [])


def check_pair(teacher_tok, student_tok, teacher, student, probes: tuple[str, ...] | list[str] = ()) -> int:
    """Refuse incompatible pairs; return the vocabulary size V both losses use (padded rows trimmed).

    Padded output rows (e.g. 151,936 vs 152,064 for a 151,665-token tokenizer) are dropped from *both*
    softmaxes: they are never labels, and an untrained padded row of one model must not leak mass into the KD target.
    """
    problems = compare_tokenizers(teacher_tok, student_tok, probes)
    if problems:
        raise TokenizerMismatch(
            "teacher and student tokenizers differ, so token-level KD would compare unrelated tokens: "
            + "; ".join(problems)
            + ". Use a student with the teacher's tokenizer (e.g. student.init_from_teacher_layers or a config with "
            "the teacher's vocab_size), distil across tokenizers with a cross-tokenizer term: loss.objective=uld, "
            "alm, gold or xproj, alone or mixed (e.g. 'ce + xproj'; docs/cross-tokenizer.md), or train with objective "
            "'ce' on teacher-generated text."
        )
    if (getattr(teacher_tok, "chat_template", None) or "") != (getattr(student_tok, "chat_template", None) or ""):
        log.warning("teacher and student chat templates differ; chat data is rendered with the student's")
    return shared_vocab(len(teacher_tok), output_size(teacher), output_size(student))


def shared_vocab(n_tokens: int, teacher_rows: int, student_rows: int) -> int:
    for who, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < n_tokens:
            raise ValueError(f"the {who}'s output layer has {rows} rows but the tokenizer has {n_tokens} tokens; "
                             f"set the {who}'s vocab_size to at least {n_tokens}")
    if teacher_rows != student_rows:
        log.info("output sizes differ (teacher %d, student %d rows); using the %d real tokens", teacher_rows, student_rows, n_tokens)
    return n_tokens


def check_student_only(tokenizer, student) -> int:
    """For label-only (CE) runs: the student's head must cover the tokenizer."""
    return shared_vocab(len(tokenizer), output_size(student), output_size(student))
