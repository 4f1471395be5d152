"""Per-example alignment tensors of cross-tokenizer KD, computed when the data is encoded.

The data is encoded with the STUDENT's tokenizer (labels are the student's). ``Aligner`` encodes the same text with
the teacher's tokenizer too, aligns both by bytes (``crosstok.align``) and gives each example these lists (collated
by ``data/batches.collate``, padded with -1), the batch keys of a cross-tokenizer run:

- ``xtok_teacher_ids`` (T'): the teacher's tokens of the text (its BOS if it adds one, its EOS appended like the
  student's), cut after the last token a kept position needs;
- ``xtok_positions`` (T-1): for each student predicted position i (i predicts token i+1), the teacher position
  that predicts the teacher token starting at the same byte after the same text (a chunk's first token on each
  side), -1 where none (inside a chunk; a side without a predicting position, e.g. no BOS there);
- ``xtok_exact`` (T-1): 1 where that chunk is one token on each side with the same bytes and piece (EOS↔EOS too);
- ``xtok_prefix`` (T-1): at an aligned position, the index in ``crosstok.projection.PREFIXES`` of the bytes between
  the chunk's start and the teacher's first token of it ("" or " " ...), -1 where none (``xproj``'s map choice);
- ``xtok_chunk`` (T-1) and ``xtok_teacher_chunk`` (T'-1): the number of the ALM chunk (within the example) whose
  token the position predicts, -1 where none. A chunk counts when every one of its tokens has a predicting
  position on both sides and all its student tokens are labelled.

Chunks are ``align``'s (shared byte boundaries) plus one for the appended EOS on both sides. Records: ``text`` and
``prompt``/``completion`` (the joined text, as ``data/encode`` tokenises it); chat ``messages`` are refused (each
tokenizer renders its own template, so the two texts differ).
"""
from __future__ import annotations

from dataclasses import dataclass

from potstill.crosstok.alignment import align, byte_spans
from potstill.crosstok.projection import prefix_index
from potstill.labels import IGNORE_INDEX

XTOK_KEYS = ("xtok_teacher_ids", "xtok_positions", "xtok_exact", "xtok_prefix", "xtok_chunk", "xtok_teacher_chunk")


@dataclass(frozen=True)
class ChunkPair:
    """One chunk as token index ranges: ``student`` and ``teacher`` tokens spelling the same bytes."""
    student: range
    teacher: range
    exact: bool  # one token on each side, same span and same piece
    prefix: int = 0  # index in projection.PREFIXES of the bytes before the teacher's first token, -1 none


def record_text(record: dict, where: str) -> str:
    """The text both tokenizers read: ``text``, or ``prompt + completion`` (as data/encode tokenises it)."""
    if "text" in record:
        return str(record["text"])
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]) + str(record["completion"])
    raise ValueError(f"{where}: cross-tokenizer distillation reads 'text' or 'prompt'/'completion' records; chat "
                     "'messages' render differently under each tokenizer's template: write them out as "
                     "prompt/completion text")


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def example_alignment(chunks: list[ChunkPair], student_len: int, teacher_ids: list[int],
                      labels: list[int]) -> dict[str, list[int]]:
    """The batch lists of one example (module docstring) from its chunks, the student's (truncated) length, the
    teacher's full token list and the student's labels."""
    kept = [c for c in chunks if c.student and c.teacher and c.student[0] < student_len]
    teacher_len = min(len(teacher_ids), max((c.teacher[-1] + 1 for c in kept), default=0))
    positions, exact, prefix = [-1] * (student_len - 1), [0] * (student_len - 1), [-1] * (student_len - 1)
    chunk, teacher_chunk = [-1] * (student_len - 1), [-1] * max(teacher_len - 1, 0)
    number = 0
    for c in kept:
        s0, t0 = c.student[0], c.teacher[0]
        if s0 < 1 or t0 < 1:  # the first token on a side without BOS: nothing predicts it there
            continue
        positions[s0 - 1], exact[s0 - 1], prefix[s0 - 1] = t0 - 1, int(c.exact), c.prefix
        whole = c.student[-1] < student_len and c.teacher[-1] < teacher_len
        if whole and all(labels[k] != IGNORE_INDEX for k in c.student):
            for k in c.student:
                chunk[k - 1] = number
            for j in c.teacher:
                teacher_chunk[j - 1] = number
            number += 1
    return {"xtok_teacher_ids": list(teacher_ids[:teacher_len]), "xtok_positions": positions, "xtok_exact": exact,
            "xtok_prefix": prefix, "xtok_chunk": chunk, "xtok_teacher_chunk": teacher_chunk}


@dataclass
class Aligner:
    """The encode hook (``data.encode.encode_all(..., annotate=)``): alignment lists for an example of the student's
    encoding."""

    teacher_tokenizer: object
    student_tokenizer: object

    def chunks(self, text: str, student_ids: list[int], where: str) -> tuple[list[ChunkPair], list[int]]:
        """Chunks of ``text`` (the appended EOS as the last one) and the teacher's ids."""
        student = byte_spans(self.student_tokenizer, text)
        teacher = byte_spans(self.teacher_tokenizer, text)
        if list(student.ids) != student_ids[: len(student.ids)] and student_ids != list(student.ids[: len(student_ids)]):
            raise ValueError(f"{where}: the student's encoding of the record differs from its encoding of the text")
        alignment = align(teacher, student)
        exact = {(m.a_index, m.b_index) for m in alignment.exact if m.same_span and m.same_piece}
        data = text.encode("utf-8")
        pairs = [ChunkPair(c.b_tokens, c.a_tokens, (c.a_tokens[0], c.b_tokens[0]) in exact,
                           prefix_index(data, c.start, teacher.starts[c.a_tokens[0]]))
                 for c in alignment.chunks if len(c.a_tokens) and len(c.b_tokens)]
        teacher_ids = with_eos(list(teacher.ids), self.teacher_tokenizer.eos_token_id)
        full_student = with_eos(list(student.ids), self.student_tokenizer.eos_token_id)
        in_chunks = {k for p in pairs for k in p.student}
        s_eos, t_eos = len(full_student) - 1, len(teacher_ids) - 1
        ends_in_eos = (full_student[-1:] == [self.student_tokenizer.eos_token_id]
                       and teacher_ids[-1:] == [self.teacher_tokenizer.eos_token_id])
        if ends_in_eos and s_eos not in in_chunks and t_eos >= 0:
            pairs.append(ChunkPair(range(s_eos, s_eos + 1), range(t_eos, t_eos + 1), True))
        return pairs, teacher_ids

    def __call__(self, record: dict, ids: list[int], labels: list[int], where: str) -> dict[str, list[int]]:
        pairs, teacher_ids = self.chunks(record_text(record, where), ids, where)
        return example_alignment(pairs, len(ids), teacher_ids, labels)
