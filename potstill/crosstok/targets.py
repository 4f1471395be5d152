"""The cross-tokenizer teacher signal (``losses.aligned.AlignedTeacher``) of a batch, from a live teacher or from
anything else that gives the same two things (a cache):

1. ``rows``: the teacher's row at each student position's aligned teacher position — (B·(T-1), ...) laid out like
   the student's predicted positions, gathered from the teacher's own sequence at ``xtok_positions`` (the
   privileged-context idea of onpolicy/self_distill.py, with -1 = none read as position 0);
2. ``teacher_label_logp`` (B, T'-1): the teacher's log-prob at T = 1 of its own next token at each of its predicted
   positions (only those with ``xtok_teacher_chunk`` ≥ 0 are read: ALM's teacher chunk sums).

``build_aligned`` does the rest (masks, the exact-match check through the vocabulary map, chunk numbering)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.crosstok.alignment import piece_bytes
from potstill.losses.aligned import AlignedTeacher, chunk_sums
from potstill.losses.chunked import project_chunks
from potstill.losses.divergences import label_logprob
from potstill.losses.targets import DenseLogits, TeacherHidden


def pieces(tokenizer, vocab: int) -> list[bytes | None]:
    """The bytes each id 0..vocab-1 stands for on its own (``alignment.piece_bytes``; None: unknowable)."""
    return piece_bytes(tokenizer, range(vocab))


def vocab_map(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int) -> Tensor:
    """(V_t,) int64: each teacher id → the lowest student id that decodes to the same bytes, -1 where none; the
    teacher's EOS → the student's EOS (both end a document, whatever they are spelled)."""
    first: dict[bytes, int] = {}
    for i, piece in enumerate(pieces(student_tokenizer, student_vocab)):
        if piece is not None:
            first.setdefault(piece, i)
    out = torch.tensor([-1 if p is None else first.get(p, -1) for p in pieces(teacher_tokenizer, teacher_vocab)],
                       dtype=torch.long)
    t_eos, s_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if t_eos is not None and s_eos is not None and t_eos < teacher_vocab and s_eos < student_vocab:
        out[t_eos] = s_eos
    return out


def global_chunks(chunk: Tensor) -> Tensor:
    """Per-example chunk numbers (B, L) → batch-wide ones (row r's chunk c → r·L + c), -1 kept."""
    rows = torch.arange(chunk.shape[0], device=chunk.device)[:, None] * chunk.shape[1]
    return torch.where(chunk >= 0, chunk + rows, -1)


def build_aligned(rows: DenseLogits | TeacherHidden, teacher_label_logp: Tensor, batch: dict,
                  mapping: Tensor, projection: Tensor | None = None) -> AlignedTeacher:
    """The ``AlignedTeacher`` of a batch from the teacher's aligned rows and its label log-probs (module doc);
    ``projection``: ``crosstok.projection.projection_maps`` (xproj's), None to build without it."""
    teacher_ids = batch["xtok_teacher_ids"]
    positions = batch["xtok_positions"]  # (B, T-1)
    student_next = batch["input_ids"][:, 1:]
    teacher_next = teacher_ids.gather(1, (positions + 1).clamp(0, teacher_ids.shape[1] - 1))
    mapping = mapping.to(positions.device)
    maps_to_label = mapping[teacher_next.clamp_min(0)] == student_next
    aligned = positions >= 0
    exact = aligned & (batch["xtok_exact"] > 0) & maps_to_label
    width = positions.shape[1]
    student_chunk = global_chunks(batch["xtok_chunk"])
    teacher_chunk = batch["xtok_teacher_chunk"]  # (B, T'-1)
    teacher_chunk = torch.where(teacher_chunk >= 0, teacher_chunk + torch.arange(
        teacher_chunk.shape[0], device=teacher_chunk.device)[:, None] * width, -1)
    n_chunks = positions.shape[0] * width
    teacher_sums = chunk_sums(teacher_label_logp.reshape(-1).float(), teacher_chunk.reshape(-1), n_chunks)
    prefix = batch.get("xtok_prefix", torch.full_like(positions, -1)).reshape(-1)  # -1: built without (xproj refuses)
    return AlignedTeacher(rows, aligned.reshape(-1), exact.reshape(-1), student_chunk.reshape(-1), teacher_sums,
                          mapping, prefix, projection)


@torch.no_grad()
def teacher_label_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_ids: Tensor,
                           wanted: Tensor, chunk_size: int = 0) -> Tensor:
    """(B, T'-1): log p(next teacher token) at T = 1 at the positions ``wanted`` (B, T'-1) marks, 0 elsewhere;
    only those rows are projected (chunk by chunk)."""
    out = torch.zeros(wanted.shape, dtype=torch.float32, device=hidden.device)
    where = wanted.nonzero(as_tuple=True)
    if not where[0].numel():
        return out
    h = hidden[:, :-1][where]
    labels = teacher_ids[:, 1:][where]
    values = torch.cat([label_logprob(F.log_softmax(z, -1), labels[sl]) for sl, z in
                        project_chunks(h.to(weight.dtype), weight, bias, chunk_size)])
    out[where] = values
    return out


@dataclass
class LiveAlignedTeacher:
    """What a cross-tokenizer run keeps: the teacher's seam over its own V_t rows and the vocabulary map."""

    seam: torch.nn.Module  # models.HiddenAndHead(teacher, V_t)
    mapping: Tensor  # (V_t,) int64
    chunk_size: int = 0
    projection: Tensor | None = None  # (P, V_t) int64: crosstok.projection.projection_maps (xproj)

    def target(self, batch: dict) -> AlignedTeacher:
        """The live teacher on its own tokens of the batch's text, gathered into the student's layout."""
        ids = batch["xtok_teacher_ids"]
        with torch.no_grad():
            h, weight, bias = self.seam(ids.clamp_min(0), (ids >= 0).long(), None)
        index = batch["xtok_positions"].clamp_min(0)[..., None].expand(-1, -1, h.shape[-1])
        rows = h.gather(1, index)
        label_logp = teacher_label_logprobs(h, weight, bias, ids, batch["xtok_teacher_chunk"] >= 0, self.chunk_size)
        return build_aligned(TeacherHidden(rows.reshape(-1, h.shape[-1]), weight, bias), label_logp, batch,
                             self.mapping, self.projection)
