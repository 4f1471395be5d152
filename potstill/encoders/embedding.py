"""Sentence-embedding distillation: the objective between pooled embeddings and its batch loss.

The objective is a weighted sum of `cosine`, `mse` and `relation` (task.embedding_objective), each a sum over the
batch's texts (the loop divides by the step's global count of texts, as for tokens). They are carried as an
``Objective`` of terms (names, weights) so the loop's metrics, non-finite checks and checkpoints treat them like
any other terms; the term functions themselves are the shared pure functions of `losses/hidden.py`."""
from __future__ import annotations

import torch
from torch import Tensor

from potstill.encoders.settings import embedding_terms
from potstill.losses import hidden
from potstill.losses.chunked import LossOutput
from potstill.losses.objective import Objective, Term


def relation_sum(student: Tensor, teacher: Tensor) -> Tensor:
    """Σ_i mean_j (S_ij − T_ij)² with S, T the batch's cosine-similarity matrices (the texts of the micro-batch as
    one set of vectors; the two widths may differ)."""
    return hidden.relation(student[None], teacher[None], similarity="cosine", loss="mse")


TERM_FUNCTIONS = {"cosine": hidden.cosine, "mse": hidden.mse, "relation": relation_sum}  # each a sum over texts


def embedding_objective(spec: str) -> Objective:
    """task.embedding_objective as an Objective of teacher terms (T = 1, no T²)."""
    terms = tuple(Term(name, weight, {}, TERM_FUNCTIONS[name], uses_labels=False)
                  for name, weight in embedding_terms(spec))
    return Objective(terms, temperature=1.0, t_squared=False)


def embedding_loss(par, batch: dict, objective: Objective, amp) -> LossOutput:
    """The student's pooled embeddings (through its seam, under autocast) against the teacher's (no grad, own
    dtype), every term as a sum over the micro-batch's texts, in fp32."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    with amp.autocast():
        student, _, _ = par.student(ids, mask)
    with torch.no_grad():
        teacher, _, _ = par.teacher(ids, mask)
    student, teacher = student.float(), teacher.float()
    sums = torch.stack([term.fn(student, teacher) for term in objective.terms])
    weights = torch.tensor([t.weight for t in objective.terms], device=sums.device)
    n = student.shape[0]
    return LossOutput((sums * weights).sum(), sums.detach(), n, n)
