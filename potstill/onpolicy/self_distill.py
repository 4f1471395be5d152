"""Self-distillation with privileged context (OPSD / SDFT), and generally "the teacher reads another sequence for
the same predicted tokens".

A batch may carry ``teacher_input_ids`` / ``teacher_attention_mask`` (B, T') and ``teacher_positions`` (B, T-1):
for each of the student's predicted positions t (t predicts token t+1), the teacher's position that predicts the
same token. ``privileged_signal`` runs the teacher on its sequence and gathers its hidden states into the student's
layout, so the unchanged loss path sees an ordinary ``TeacherHidden``.

With a record's ``privileged_context`` (tokenised without special tokens: ``Example.privileged_ids``) the
teacher's row is the student's row with those tokens inserted after its BOS (at the start when there is none):
teacher = [BOS] + privileged + prompt + completion, so every student position t maps to t + len(privileged).

The teacher itself (``teacher.self_distill``): ``frozen`` — a copy of the initial student; ``ema`` — a copy
updated after every optimiser step as θ_T ← d·θ_T + (1 − d)·θ_S; ``live`` — the student's own weights, called
unwrapped, without gradient and in eval mode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from potstill.losses.targets import TeacherHidden
from potstill.models import HiddenAndHead


def student_copy(cfg, student: nn.Module) -> nn.Module | None:
    """The teacher model for teacher.self_distill frozen/ema (a frozen copy of the initial student), else None."""
    if cfg.teacher.self_distill not in ("frozen", "ema"):
        return None
    return copy.deepcopy(student).eval().requires_grad_(False)


class LiveTeacher(nn.Module):
    """The student's own forward seam as a frozen teacher: unwrapped (no DDP hooks), in eval mode (no dropout);
    the caller (``teacher_signal.frozen_signal`` / ``privileged_signal``) runs it without gradient."""

    def __init__(self, student: nn.Module, vocab: int):
        super().__init__()
        self.seam = HiddenAndHead(student, vocab)

    def forward(self, *args):
        model = self.seam.model
        was_training = model.training
        model.eval()
        try:
            return self.seam(*args)
        finally:
            model.train(was_training)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """θ_T ← decay·θ_T + (1 − decay)·θ_S for every parameter (same order: the teacher is a deepcopy); buffers
    are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def with_teacher_view(batch: dict, privileged: dict[int, list[int]], bos_id: int | None) -> dict:
    """The batch plus the teacher's sequence (privileged tokens after BOS) and the position map; unchanged when no
    example of the batch has a privileged context."""
    if not any(privileged.get(i) for i in batch["example_id"].tolist()):
        return batch
    if "attention_mask" not in batch:
        raise ValueError("privileged_context with data.packing is not supported; set data.packing=false")
    rows, offsets = [], []
    for ids, mask, example in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                  batch["example_id"].tolist()):
        ids, extra = ids[: sum(mask)], privileged.get(example) or []
        k = 1 if bos_id is not None and ids[:1] == [bos_id] else 0
        rows.append(ids[:k] + extra + ids[k:])
        offsets.append(len(extra))
    width = max(len(r) for r in rows)
    teacher_ids = torch.zeros((len(rows), width), dtype=torch.long)
    teacher_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        teacher_ids[r, : len(row)] = torch.tensor(row)
        teacher_mask[r, : len(row)] = 1
    predicted = batch["input_ids"].shape[1] - 1
    positions = torch.arange(predicted)[None] + torch.tensor(offsets)[:, None]  # (B, T-1)
    device = batch["input_ids"].device
    return {**batch, "teacher_input_ids": teacher_ids.to(device), "teacher_attention_mask": teacher_mask.to(device),
            "teacher_positions": positions.clamp_max(width - 1).to(device)}


def privileged_signal(seam, batch: dict) -> TeacherHidden:
    """The teacher's hidden states on its own sequence, gathered at the positions that predict the student's
    tokens: (B·(T-1), H), laid out like the student's predicted positions."""
    with torch.no_grad():
        h, weight, bias = seam(batch["teacher_input_ids"], batch["teacher_attention_mask"], None)
    index = batch["teacher_positions"][..., None].expand(-1, -1, h.shape[-1])
    h = h.gather(1, index)
    return TeacherHidden(h.reshape(-1, h.shape[-1]), weight, bias)
