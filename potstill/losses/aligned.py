"""The teacher signal of cross-tokenizer KD as data, and how the cross-tokenizer terms read it.

A teacher with another tokenizer reads the same text as other tokens, so its rows are not the student's. The loop
(``crosstok/targets.py``, or a cache) turns it into an ``AlignedTeacher``: per student predicted position (the
flattened N = B·(T-1) positions of ``fused_loss``)

- ``rows``: the teacher's row at the ALIGNED teacher position — the position whose next token starts at the same
  byte after the same text (a shared chunk boundary of ``crosstok.align``) — over the teacher's vocabulary V_t, as a
  dense-capable target (``TeacherHidden`` for a live teacher, ``DenseLogits`` raw logits or tempered log-probs from
  a cache); rows of positions with no aligned teacher position hold anything finite;
- ``aligned`` (N,) bool: the position has an aligned teacher position (ULD and the hybrid's ULD part count there);
- ``exact`` (N,) bool: the chunk starting there is one token on each side, same bytes, same piece, and the teacher
  token maps to the student's label through ``vocab_map`` (the hybrid's divergence part counts there);
- ``chunk`` (N,) int64: the ALM chunk the position's label token belongs to (an index into ``chunk_teacher_logp``),
  -1 where none (prompt tokens, a chunk with no predicting position on one side);
- ``chunk_teacher_logp`` (C,): the teacher's chunk log-likelihood Σ log p(y_j) over the chunk's teacher tokens, T = 1;
- ``vocab_map`` (V_t,) int64: teacher id → the student id with the identical piece, -1 where none;
- ``prefix`` (N,) int64 and ``projection`` (P, V_t) int64 (``xproj``; ``crosstok/projection.py``): the index of the
  whitespace between the position's chunk start and the teacher's next token (-1 none), and per such prefix the map
  teacher id → the first student id of the student's encoding of prefix + the id's piece (-1 none). ``projection``
  is None where the signal was built without it (then xproj refuses).

Registered cross-tokenizer terms (``crosstok`` on their registry entry): ``aligned`` (uld), ``hybrid`` (gold),
``projected`` (xproj: the fn compares the student with the teacher projected onto the student's vocabulary), and
``chunk`` (alm: it couples the positions of a chunk, so ``fused_loss`` first runs a no-grad pre-pass over the
student's label log-probs, ``prepare_chunk_terms``; each position then adds g_c·log q(y_i) to the gradient and its
chunk's loss, once, to the value). With a same-vocabulary target (identical tokenizers) every position is aligned,
exact and its own chunk, so the same terms run on ordinary ``DenseLogits`` / ``TeacherHidden`` targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from potstill.labels import IGNORE_INDEX
from potstill.losses.crosstok_terms import sorted_l1
from potstill.losses.divergences import label_logprob
from potstill.losses.targets import MIN_TEACHER_LOGP, DenseLogits, TeacherHidden, teacher_logprobs

@dataclass
class AlignedChunk:
    """An ``AlignedTeacher`` cut to one chunk of positions (n rows), as ``chunked.chunk_term_sums`` uses it."""

    teacher: Tensor  # (n, V_t) teacher logits (or tempered log-probs) at the aligned positions
    aligned: Tensor  # (n,) bool
    exact: Tensor  # (n,) bool
    vocab_map: Tensor  # (V_t,) int64
    alm: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # term index → (value (n,), g (n,))
    prefix: Tensor | None = None  # (n,) int64, -1 none
    projection: Tensor | None = None  # (P, V_t) int64


@dataclass
class AlignedTeacher:
    """The cross-tokenizer teacher signal (fields: module docstring). Build one with ``crosstok.targets``."""

    rows: DenseLogits | TeacherHidden
    aligned: Tensor
    exact: Tensor
    chunk: Tensor
    chunk_teacher_logp: Tensor
    vocab_map: Tensor
    prefix: Tensor | None = None
    projection: Tensor | None = None
    # filled by ``prepare_chunk_terms`` (per ALM term index): per-position value and gradient coefficient (N,)
    alm: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def temperature(self) -> float | None:
        return self.rows.temperature

    @property
    def teacher_vocab(self) -> int:
        return self.vocab_map.shape[0]

    def chunk_aligned(self, sl: slice) -> AlignedChunk:
        teacher = self.rows.chunk_logits(sl)[:, : self.teacher_vocab].detach()
        return AlignedChunk(teacher, self.aligned[sl], self.exact[sl], self.vocab_map,
                            {i: (v[sl], g[sl]) for i, (v, g) in self.alm.items()},
                            None if self.prefix is None else self.prefix[sl], self.projection)


def is_aligned(target) -> bool:
    return isinstance(target, AlignedTeacher)


# ---- the ALM pre-pass -------------------------------------------------------------------------------------------


def chunk_sums(values: Tensor, chunk: Tensor, n_chunks: int) -> Tensor:
    """Σ values over the positions of each chunk (C,); positions with chunk -1 are left out."""
    inside = chunk >= 0
    return values.new_zeros(n_chunks).index_add_(0, chunk[inside], values[inside].to(values.dtype))


def last_position_of_chunk(chunk: Tensor) -> Tensor:
    """(N,) bool: the position is the last one of its chunk (where the chunk's loss is counted, once)."""
    positions = torch.arange(chunk.shape[0], device=chunk.device)
    inside = chunk >= 0
    n_chunks = int(chunk.max()) + 1 if inside.any() else 0
    last = torch.full((n_chunks,), -1, dtype=torch.long, device=chunk.device)
    last.scatter_reduce_(0, chunk[inside], positions[inside], "amax")
    out = torch.zeros_like(inside)
    out[last[last >= 0]] = True
    return out


@torch.no_grad()
def prepare_chunk_terms(target: AlignedTeacher, terms, student_label_logp: Tensor, labels: Tensor) -> AlignedTeacher:
    """The ALM pre-pass: the student's chunk log-likelihoods S_c = Σ log q(y_i) (T = 1) from ``student_label_logp``
    (N,), each chunk term's loss L_c = fn(S_c, T_c) and g_c = dL_c/dS_c (autograd on the (C,) tensor). Returns the
    target with, per term index, the value (L_c at the chunk's last position, 0 elsewhere) and g (g_c at every
    position of c, 0 elsewhere)."""
    chunk = torch.where(labels != IGNORE_INDEX, target.chunk, -1)
    n_chunks = target.chunk_teacher_logp.shape[0]
    student = chunk_sums(student_label_logp.float(), chunk, n_chunks)
    teacher = target.chunk_teacher_logp.float()
    last = last_position_of_chunk(chunk)
    index = chunk.clamp_min(0)
    alm = {}
    for i, term in enumerate(terms):
        if term.crosstok != "chunk":
            continue
        with torch.enable_grad():
            s = student.clone().requires_grad_()
            loss = term(s, teacher)
            (g,) = torch.autograd.grad(loss.sum(), s)
        alm[i] = (torch.where(last, loss.detach()[index], 0.0), torch.where(chunk >= 0, g[index], 0.0))
    return replace(target, alm=alm)


# ---- per-chunk values -------------------------------------------------------------------------------------------


def mapped_bins(student_logp: Tensor, teacher_logp: Tensor, vocab_map: Tensor) -> tuple[Tensor, Tensor]:
    """Both distributions (n, V_s) and (n, V_t) put on the M student ids that some teacher id maps to, plus one
    bin for everything else — the teacher's mass on unmapped ids, the student's on ids no teacher id maps to:
    (n, M + 1) log-probs each. Teacher ids mapped to the same student id add up. When one side has no unmapped id
    (a student vocabulary inside the teacher's, or the reverse) its "else" bin would be empty while the other's is
    not — an infinite divergence at β = 0 or 1 — so the bin is dropped on both sides and each distribution
    renormalised over the M mapped bins."""
    mapped = vocab_map >= 0
    hit = torch.zeros(student_logp.shape[-1], dtype=torch.bool, device=student_logp.device)
    hit[vocab_map[mapped]] = True
    ids = hit.nonzero().squeeze(-1)  # (M,)
    p = teacher_logp.exp()
    projected = p.new_zeros(student_logp.shape).index_add_(1, vocab_map[mapped], p[:, mapped])[:, ids]
    if bool(mapped.all()) or bool(hit.all()):  # vocabulary facts: no host sync per chunk beyond these two
        student_bins = student_logp[:, ids]
        teacher_bins = projected.log()
        return (student_bins - student_bins.logsumexp(-1, keepdim=True),
                (teacher_bins - teacher_bins.logsumexp(-1, keepdim=True)).clamp_min(MIN_TEACHER_LOGP))
    teacher_rest = p[:, ~mapped].sum(-1, keepdim=True)
    student_rest = torch.logsumexp(student_logp[:, ~hit], -1, keepdim=True)
    teacher_bins = torch.cat([projected, teacher_rest], -1).log().clamp_min(MIN_TEACHER_LOGP)
    return torch.cat([student_logp[:, ids], student_rest], -1), teacher_bins


def projected_target(teacher_logp: Tensor, maps: Tensor, prefix: Tensor,
                     student_vocab: int) -> tuple[Tensor, Tensor]:
    """The teacher's distribution (n, V_t) summed into student bins through the map of each row's prefix: (n, V_s)
    log-probs renormalised over the mapped mass (mass on ids that map nowhere is dropped), and (n,) bool: the row has
    a map (prefix ≥ 0) and some mapped mass. Other rows hold a uniform distribution (finite; the caller masks them)."""
    p = teacher_logp.exp()
    out = p.new_zeros(p.shape[0], student_vocab + 1)  # the last column collects the ids that map nowhere
    for k in range(maps.shape[0]):  # one (V_t,) index per prefix: no (n, V_t) index tensor is materialised
        rows = (prefix == k).to(p.dtype)[:, None]
        out.index_add_(1, torch.where(maps[k] >= 0, maps[k], student_vocab), p * rows)
    mass = out[:, :student_vocab]
    total = mass.sum(-1, keepdim=True)
    ok = (prefix >= 0) & (total.squeeze(-1) > 0)
    mass = torch.where(ok[:, None], mass / total.clamp_min(torch.finfo(mass.dtype).tiny), 1.0 / student_vocab)
    return mass.log(), ok


def given_chunk_start(student_logp: Tensor, maps: Tensor, prefix: Tensor) -> Tensor:
    """The student's distribution (n, V_s) renormalised over the ids its row's map reaches (the ids that can start a
    chunk after that prefix; -inf elsewhere): q(s | a new chunk starts). Rows with prefix -1 keep every id."""
    reach = torch.zeros(maps.shape[0] + 1, student_logp.shape[-1], dtype=torch.bool, device=student_logp.device)
    for k in range(maps.shape[0]):
        reach[k, maps[k][maps[k] >= 0]] = True
    reach[-1] = True
    masked = torch.where(reach[torch.where(prefix >= 0, prefix, maps.shape[0])], student_logp, float("-inf"))
    return masked - torch.logsumexp(masked, -1, keepdim=True)


def aligned_term_values(term, index: int, logq_t: Tensor, logq_1: Tensor | None, logp_t: Tensor | None,
                        chunk: AlignedChunk, labels: Tensor) -> Tensor:
    """A cross-tokenizer term's per-position value (n,) on an ``AlignedChunk`` (see the module docstring)."""
    if term.crosstok == "chunk":
        value, g = chunk.alm[index]
        y = label_logprob(logq_1, labels)
        return value + g * (y - y.detach())  # the chunk's loss as value, g_c·∇log q(y_i) as gradient
    zero = logq_t.new_zeros(())
    if term.crosstok == "projected":
        if chunk.projection is None:
            raise ValueError("xproj needs the teacher projected onto the student's vocabulary, and this signal was "
                             "built without the projection maps (crosstok/projection.py)")
        maps = chunk.projection.to(logp_t.device)
        target, ok = projected_target(logp_t, maps, chunk.prefix, logq_t.shape[-1])
        student = given_chunk_start(logq_t, maps, chunk.prefix)  # the alignment conditions on a chunk starting here
        return torch.where(chunk.aligned & ok, term(student, target), zero)
    uld = torch.where(chunk.aligned, sorted_l1(logq_t, logp_t), zero)
    if term.crosstok == "aligned":
        return uld
    hp = term.hparams
    student_bins, teacher_bins = mapped_bins(logq_t, logp_t, chunk.vocab_map)
    matched = term(student_bins, teacher_bins)  # gold's registered fn: the weighted divergence on the bins
    return torch.where(chunk.exact, matched, hp["unmatched_weight"] * uld)


def same_vocab_values(term, logq_t: Tensor, logq_1: Tensor, teacher: Tensor, labels: Tensor, divisor: float,
                      tau: float) -> Tensor:
    """A cross-tokenizer term on a same-vocabulary dense target (identical tokenizers): every position is aligned and
    an exact match under the identity map, every token its own chunk (alm then compares log q(y) with log p(y))."""
    if term.crosstok != "chunk":
        return term(logq_t, teacher_logprobs(teacher, divisor))
    if divisor == 1.0 and tau != 1.0:
        raise ValueError("alm needs the teacher at T = 1; this signal holds log-probs at another temperature")
    return term(label_logprob(logq_1, labels), label_logprob(teacher_logprobs(teacher, divisor / tau), labels))


def term_values(term, index: int, logq_t: Tensor, logq_1: Tensor, teacher, labels: Tensor, divisor: float,
                tau: float) -> Tensor:
    """Per-position values (n,) of cross-tokenizer term number ``index`` on a chunk's teacher signal: an
    ``AlignedChunk`` (another tokenizer) or a dense (n, V) tensor over the student's own vocabulary."""
    if isinstance(teacher, AlignedChunk):
        logp_t = None if term.crosstok == "chunk" else teacher_logprobs(teacher.teacher, divisor)
        return aligned_term_values(term, index, logq_t, logq_1, logp_t, teacher, labels)
    return same_vocab_values(term, logq_t, logq_1, teacher, labels, divisor, tau)


def needs_prepass(objective, target) -> bool:
    return is_aligned(target) and any(t.crosstok == "chunk" for t in objective.terms)


def check_support(objective, target) -> None:
    """Refuse, in one line, what a cross-tokenizer signal cannot serve and what cross-tokenizer terms cannot read."""
    if is_aligned(target):
        same_vocab = [t.name for t in objective.terms if not t.uses_labels and t.crosstok is None]
        if same_vocab:
            raise ValueError(f"the teacher has its own tokenizer, so {', '.join(same_vocab)} (a comparison over one "
                             "shared vocabulary) cannot be computed: use the cross-tokenizer terms uld, gold, xproj or "
                             "alm (docs/cross-tokenizer.md)")
        if objective.selection is not None or objective.tracks_nll:
            raise ValueError("loss.select and temperature schedules need the teacher on the student's vocabulary; "
                             "with a teacher of another tokenizer leave them unset")
    elif objective.crosstok_terms and not isinstance(target, (DenseLogits, TeacherHidden)):
        raise ValueError(f"{', '.join(objective.crosstok_terms)} need the teacher's full distribution (a live "
                         f"teacher or a dense cache), not a {type(target).__name__} signal")
