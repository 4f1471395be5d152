"""The teacher signal of a batch, as data the fused loss reads (docs/architecture.md, "A teacher signal is data"):
a cache lookup, a server's scores, a teacher of another tokenizer aligned by bytes, the privileged view, a
classifier's (or LELP's) classes, the live teacher's states, or several teachers' mixture."""
from __future__ import annotations

import torch

from potstill import runtime
from potstill.assemble import Parts
from potstill.cache.targets import batch_target
from potstill.encoders import loop as encoder_loop
from potstill.losses.objective import Objective
from potstill.losses.targets import TeacherHidden
from potstill.onpolicy.self_distill import privileged_signal


def frozen_signal(seam, batch: dict) -> TeacherHidden:
    """A frozen model's (teacher's, reference's) hidden states and head for the predicted positions, through its
    forward seam (``models.HiddenAndHead``, FSDP-sharded under parallel.teacher=shard)."""
    with torch.no_grad():
        h, weight, bias, *extra = seam(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    h = h[:, :-1]
    return TeacherHidden(h.reshape(-1, h.shape[-1]), weight, bias, extra=tuple(extra))  # extra: hidden-state KD


def teacher_target(parts: Parts, par: runtime.Parallel, batch: dict, objective: Objective):
    """The teacher signal for this batch: looked up in the cache by example id, or the live teacher's states."""
    if not objective.needs_teacher and parts.hidden is None:  # hidden-state KD reads the live teacher's states
        return None
    if parts.teachers is not None:  # several teachers mixed into one target (multiteacher/teachers.py)
        return parts.teachers.target(batch, objective.tau, lambda: first_teacher_target(parts, par, batch), frozen_signal)
    return first_teacher_target(parts, par, batch)


def first_teacher_target(parts: Parts, par: runtime.Parallel, batch: dict):
    """The (first) teacher's signal: cache lookup, server scores, the privileged view or the live teacher."""
    if parts.cache is not None:
        return batch_target(parts.cache, batch, parts.vocab)
    if parts.server is not None:
        return parts.server.target(batch, parts.vocab)
    if parts.crosstok is not None:  # a teacher with its own tokenizer, aligned by bytes (crosstok/targets.py)
        return parts.crosstok.target(batch)
    if "teacher_input_ids" in batch:  # the teacher reads its own sequence (privileged context: onpolicy/self_distill.py)
        return privileged_signal(par.teacher, batch)
    if encoder_loop.is_encoder_run(parts):  # a classifier's classes, or LELP's pseudo-subclasses
        return encoder_loop.teacher_target(parts, frozen_signal(par.teacher, batch))
    return frozen_signal(par.teacher, batch)
