"""The teacher's next-token distribution projected onto the student's vocabulary at an aligned position (``xproj``).

At an aligned position both models have read the same text and their next tokens start at the same byte (a shared
chunk boundary, ``crosstok.align``). The teacher's token t then stands for the bytes ``prefix + piece(t)``, where
``prefix`` is what lies between the boundary and the teacher's token in the text (the whitespace a word-level
tokenizer drops: " " before "cat" in "the cat"; "" for a byte-level teacher whose "Ġcat" starts at the boundary).
The student would begin those bytes with the first token of its own encoding of them, so t's probability goes to
that student id. One (V_t,) map per prefix, precomputed; each aligned position picks the map of its prefix
(``xtok_prefix``, an index into ``PREFIXES``, computed at encode time by ``crosstok.batches.Aligner``). The teacher at
an aligned position has read a complete chunk, which the student cannot know, so the loss compares the student given
that a chunk starts (``losses.aligned.given_chunk_start``) with this target.

Exact where the student's tokenisation of the continuation ``prefix + piece(t) + rest`` starts with the first token of
its encoding of ``prefix + piece(t)`` alone — e.g. the observed token when the teacher's next token is a whole
chunk and the student's first token of the chunk is the first token of its encoding of those bytes. Approximate:
(1) an alternative t is assumed to follow the same prefix as the observed token (a word-level teacher predicting ","
after "cat" where the text continues " dog" is mapped as " ,"); (2) a student token that would merge across the end
of piece(t) with the bytes after it (BPE merges depend on what follows); (3) teacher ids with no bytes of their own
(BOS, pad, unk, other special tokens; EOS goes to the student's EOS) map nowhere: their mass is dropped and the
projected distribution renormalised.
"""
from __future__ import annotations

import torch
from torch import Tensor

from potstill.crosstok.targets import pieces

PREFIXES = ("", " ", "\n")  # the whitespace between a shared boundary and the teacher's token that gets its own map


def prefix_index(text: bytes, boundary: int, teacher_start: int) -> int:
    """Index into ``PREFIXES`` of the bytes between a chunk's start and its first teacher token's start, -1 if none."""
    try:
        return PREFIXES.index(text[boundary:teacher_start].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return -1


def first_student_ids(student_tokenizer, texts: list[str]) -> list[int]:
    """The first id of the student's encoding of each text (no special tokens added), -1 for an empty encoding."""
    encoded = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids[0] if ids else -1 for ids in encoded]


def _whole_text(piece: bytes | None) -> str:
    """The piece as text, "" when it is unknowable or not whole UTF-8 characters."""
    try:
        return "" if piece is None else piece.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def projection_maps(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int) -> Tensor:
    """(len(PREFIXES), V_t) int64: row k sends teacher id t to the first student id of the student's encoding of
    ``PREFIXES[k] + piece(t)``; -1 for special tokens, empty pieces and pieces that are not whole characters (a lone
    byte of a multi-byte character has no text to encode), the teacher's EOS → the student's EOS."""
    texts = [_whole_text(p) for p in pieces(teacher_tokenizer, teacher_vocab)]
    special = set(teacher_tokenizer.all_special_ids)
    rows = []
    for prefix in PREFIXES:
        firsts = first_student_ids(student_tokenizer, [prefix + t for t in texts])
        rows.append([s if i not in special and texts[i] and 0 <= s < student_vocab else -1
                     for i, s in enumerate(firsts)])
    maps = torch.tensor(rows, dtype=torch.long)
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None and t_eos < teacher_vocab and s_eos < student_vocab:
        maps[:, t_eos] = s_eos
    return maps
