"""Whether a run distils across tokenizers, decided when the parts are loaded (``assemble.load_parts``).

Teacher and student tokenizers that behave the same: the ordinary pair check (``guardrails.check_pair``), one shared
vocabulary. Different ones: with a cross-tokenizer term in the objective (uld, gold, alm) the run goes on — the data
is encoded with the student's tokenizer and aligned with the teacher's (``crosstok.batches.Aligner``), the teacher
runs on its own tokens (``crosstok.targets.LiveAlignedTeacher``); without one, ``TokenizerMismatch`` names the way out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from potstill.crosstok.batches import Aligner
from potstill.crosstok.projection import projection_maps
from potstill.crosstok.targets import LiveAlignedTeacher, vocab_map
from potstill.guardrails import check_pair, check_student_only, compare_tokenizers
from potstill.models import HiddenAndHead

log = logging.getLogger("potstill")


@dataclass
class CrossTokenizerRun:
    """What a cross-tokenizer run adds to its parts: the loss-side teacher and the encode-time aligner."""

    teacher: LiveAlignedTeacher
    aligner: Aligner

    def target(self, batch: dict):
        return self.teacher.target(batch)

    def check_examples(self, examples) -> None:
        """Nothing to check before step 1: the live teacher reads whatever the alignment gives it (a cached
        teacher checks its tokens: cache/crosstok.py)."""


def refused_settings(cfg) -> list[str]:
    """Settings a cross-tokenizer run cannot honour, each as 'key=value (why)'."""
    out = []
    if cfg.data.packing:
        out.append("data.packing=true (the alignment lists are per padded row)")
    if cfg.data.regime != "offline":
        out.append(f"data.regime={cfg.data.regime} (rollouts are the student's tokens; the teacher reads text)")
    if cfg.loss.reference:
        out.append("loss.reference (token selection needs one shared vocabulary)")
    if getattr(cfg.parallel, "teacher", "replicate") == "shard":
        out.append("parallel.teacher=shard (the teacher's own-vocabulary seam is not sharded)")
    return out


def check_teacher_pair(cfg, objective, teacher_tok, student_tok, teacher, student, probes, chunk_size: int = 0):
    """(V_s, CrossTokenizerRun or None): the student's vocabulary size the loss uses, and the cross-tokenizer
    parts when the tokenizers differ and the objective holds a cross-tokenizer term."""
    problems = compare_tokenizers(teacher_tok, student_tok, probes)
    if not problems or not objective.crosstok_terms:
        return check_pair(teacher_tok, student_tok, teacher, student, probes), None  # raises on problems
    check_cross_settings(cfg, objective, problems)
    student_vocab = check_student_only(student_tok, student)
    teacher_vocab = check_student_only(teacher_tok, teacher)
    mapping = vocab_map(teacher_tok, student_tok, teacher_vocab, student_vocab)
    log.info("cross-tokenizer distillation (%s): teacher %d tokens, student %d; %d teacher ids map to a student id "
             "with the same piece", ", ".join(objective.crosstok_terms), teacher_vocab, student_vocab,
             int((mapping >= 0).sum()))
    seam = HiddenAndHead(teacher, teacher_vocab)
    projection = projection_maps(teacher_tok, student_tok, teacher_vocab, student_vocab)
    return student_vocab, CrossTokenizerRun(LiveAlignedTeacher(seam, mapping, chunk_size, projection),
                                            Aligner(teacher_tok, student_tok))


def check_cross_settings(cfg, objective, problems: list[str]) -> None:
    """A run across tokenizers (``problems``: how they differ) may go on: only cross-tokenizer terms and ce, and
    no setting it cannot honour (live teacher and cache alike)."""
    same_vocab = [t.name for t in objective.terms if not t.uses_labels and t.crosstok is None]
    if same_vocab:
        raise ValueError(f"teacher and student tokenizers differ, so loss.objective's {', '.join(same_vocab)} (a "
                         "comparison over one shared vocabulary) cannot be computed: keep only cross-tokenizer terms "
                         "(uld, gold, xproj, alm) and ce (docs/cross-tokenizer.md)")
    refused = refused_settings(cfg)
    if refused:
        raise ValueError(f"teacher and student tokenizers differ ({problems[0][:80]}...), and cross-tokenizer "
                         f"distillation does not support: {'; '.join(refused)}")
