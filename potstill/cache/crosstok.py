"""A teacher-signal cache serving a student with ANOTHER tokenizer (docs/cross-tokenizer.md, "Cross-tokenizer
caches"): the cross-tokenizer target (``losses.aligned.AlignedTeacher``) of a batch built from the cache exactly as
``crosstok.targets.LiveAlignedTeacher.target`` builds it from the live teacher.

The cache is built with the TEACHER's tokenizer (``potstill cache``: its examples are the teacher's tokens of each
record, truncated to ``data.max_length``) and ``CacheSpec.cross_tokenizer``, which adds per example the teacher's
token ids (``input_ids`` (L,)) and the T = 1 log-prob of each of its own next tokens (``label_logprobs`` (P,)).
The run encodes the data with the student's tokenizer and aligns it with the cache's tokenizer (saved in the
cache's ``tokenizer/``, checked by fingerprint), which gives each example ``xtok_teacher_ids``. The teacher is
causal, so its row at teacher position j depends only on its first j + 1 tokens: the cached row j is the live
row j whenever the cached tokens and the run's agree up to j. ``check_cached_alignment`` checks exactly that, and
that the cache holds every row the run reads, for every training example before step 1.

What the target reads from the cache: the teacher's row at each student position's aligned teacher position
(``xtok_positions``) — dense: the stored log-probs at the cache's T (exact); top-k: the k stored log-probs and the
tail mass spread evenly over the other V − k ids (the maximum-entropy completion; an approximation of what the
live teacher gives ULD and the hybrid, documented) — and ``label_logprobs`` where ``xtok_teacher_chunk`` ≥ 0
(ALM's teacher chunk sums: exact in both modes). Sampled caches carry no distribution to align and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.cache.format import CacheError, CacheSpec
from potstill.cache.opening import open_cache
from potstill.cache.reader import CacheReader
from potstill.crosstok.batches import Aligner
from potstill.crosstok.projection import projection_maps
from potstill.crosstok.setup import check_cross_settings
from potstill.crosstok.targets import build_aligned, vocab_map
from potstill.guardrails import check_student_only
from potstill.data.encode import Example
from potstill.losses.aligned import AlignedTeacher
from potstill.losses.targets import TAIL_FLOOR, DenseLogits

CROSS_FIELDS = ("input_ids", "label_logprobs")
MODES = ("dense", "topk")


def check_cross_tokenizer_spec(reader: CacheReader, terms: list[str]) -> None:
    """The cache can serve a cross-tokenizer run at all (one line each otherwise)."""
    spec = reader.spec
    if not spec.cross_tokenizer or not all(name in reader.manifest["tensors"] for name in CROSS_FIELDS):
        raise CacheError(f"the cache at {reader.dir} has no cross-tokenizer fields ({', '.join(CROSS_FIELDS)}), which "
                         f"a student with another tokenizer needs ({', '.join(terms)}): rebuild it with `potstill "
                         "cache` and this run's config (an objective with uld/alm/gold/xproj stores them)")
    if spec.mode not in MODES:
        raise CacheError(f"a {spec.mode} cache holds no teacher distribution to align with another tokenizer: "
                         "build it with cache.mode=dense (exact) or cache.mode=topk")


def rows_needed(example: Example) -> int:
    """How many of its teacher predicted positions the run reads for this example (the aligned rows and the ALM
    teacher chunk positions): 1 + the largest such position, 0 for none."""
    read = [p for p in example.extra["xtok_positions"] if p >= 0]
    read += [j for j, c in enumerate(example.extra["xtok_teacher_chunk"]) if c >= 0]
    return max(read, default=-1) + 1


def check_cached_alignment(reader: CacheReader, examples: list[Example]) -> None:
    """Every training example is in the cache with the teacher tokens this run aligned to, and the cache holds each
    teacher row the run reads (a cache truncated to a shorter data.max_length than the teacher side needs fails)."""
    for e in examples:
        if not reader.has(e.example_id):
            raise CacheError(f"training example {e.example_id} is not in the cache at {reader.dir}: the data changed "
                             "since the cache was built; rebuild it with `potstill cache`")
        cached = reader.read_tensor(e.example_id, "input_ids").tolist()
        teacher = e.extra["xtok_teacher_ids"]
        common = min(len(cached), len(teacher))
        if cached[:common] != teacher[:common]:
            raise CacheError(f"training example {e.example_id}: the cache holds other teacher tokens than this run's "
                             "alignment (the data or the cache's tokenizer changed): rebuild the cache")
        needed = rows_needed(e)
        if needed > len(cached) - 1:
            raise CacheError(f"training example {e.example_id}: the run reads {needed} teacher positions but the "
                             f"cache holds {len(cached) - 1} (it was truncated to {len(cached)} teacher tokens): "
                             "rebuild the cache with a larger data.max_length")


def dense_rows(signal: dict[str, Tensor], spec: CacheSpec, vocab: int) -> Tensor:
    """(P, V_t) teacher log-probs at the cache's T: the stored rows (dense), or top-k + the tail spread evenly."""
    if spec.mode == "dense":
        return signal["logprobs"]
    ids, logprobs = signal["ids"], signal["logprobs"]  # (P, k)
    spread = signal["tail_mass"].clamp_min(TAIL_FLOOR) / max(vocab - spec.k, 1)  # (P,)
    rows = spread.log()[:, None].expand(-1, vocab).clone()
    return rows.scatter_(1, ids, logprobs)


def aligned_cache_target(reader: CacheReader, batch: dict, mapping: Tensor,
                         projection: Tensor | None = None) -> AlignedTeacher:
    """The ``AlignedTeacher`` of a (padded) cross-tokenizer batch from the cache (module doc)."""
    spec = reader.spec
    positions, teacher_chunk = batch["xtok_positions"], batch["xtok_teacher_chunk"]  # (B, T-1), (B, T'-1)
    example_ids = batch["example_id"].tolist()
    if len(example_ids) != positions.shape[0]:
        raise CacheError("a packed batch cannot be aligned across tokenizers: set data.packing=false")
    vocab = mapping.shape[0]
    rows, label_logp = [], torch.zeros(teacher_chunk.shape, dtype=torch.float32)
    for b, example_id in enumerate(example_ids):
        signal = reader.read(int(example_id))
        table = dense_rows(signal, spec, vocab)
        if table.shape[0] == 0:  # a one-token teacher example predicts nothing: any finite row (never read)
            table = torch.zeros(1, vocab)
        rows.append(table[positions[b].clamp(0, table.shape[0] - 1).cpu()])  # (T-1, V_t); -1 (none) reads row 0
        n = min(teacher_chunk.shape[1], signal["label_logprobs"].shape[0])
        label_logp[b, :n] = signal["label_logprobs"][:n]
    device = positions.device
    dense = DenseLogits(torch.stack(rows).reshape(-1, vocab).to(device), spec.temperature)
    label_logp = torch.where(teacher_chunk >= 0, label_logp.to(device), 0.0)  # -inf where unread would be 0·inf
    return build_aligned(dense, label_logp, batch, mapping, projection)



@dataclass
class CachedCrossTokenizerRun:
    """A cross-tokenizer run whose teacher signal comes from a cache (the live one: ``crosstok.setup``): the same
    encode-time aligner, the target read from the cache, the cache checked against the alignment before step 1."""

    reader: CacheReader
    mapping: Tensor  # (V_t,) teacher id → student id with the same piece, -1 none
    aligner: Aligner
    projection: Tensor | None = None  # (P, V_t) int64: crosstok.projection.projection_maps (xproj)

    def target(self, batch: dict) -> AlignedTeacher:
        return aligned_cache_target(self.reader, batch, self.mapping, self.projection)

    def check_examples(self, examples: list[Example]) -> None:
        check_cached_alignment(self.reader, examples)


def open_cross_tokenizer_cache(cfg, cache_tok, student_tok, student, problems: list[str]) -> tuple[int, CachedCrossTokenizerRun]:
    """(V_s, the cached cross-tokenizer run) for ``teacher.cache`` built with ``cache_tok`` (the teacher's) and a
    student with ``student_tok``; every check of the cache that does not need the data happens here."""
    objective = cfg.objective()
    check_cross_settings(cfg, objective, problems)
    teacher_vocab = len(cache_tok)
    reader = open_cache(cfg, cache_tok, teacher_vocab)
    check_cross_tokenizer_spec(reader, objective.crosstok_terms)
    student_vocab = check_student_only(student_tok, student)
    mapping = vocab_map(cache_tok, student_tok, teacher_vocab, student_vocab)
    projection = projection_maps(cache_tok, student_tok, teacher_vocab, student_vocab)
    return student_vocab, CachedCrossTokenizerRun(reader, mapping, Aligner(cache_tok, student_tok), projection)
