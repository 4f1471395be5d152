"""Held-out metrics of the encoder kinds (`train.run_eval` calls ``evaluate`` for them).

- sequence_classification: accuracy (student and teacher, against the records' labels), agreement (the student's
  predicted class equals the teacher's), KL(teacher‖student) over classes at T = 1 and the student's label CE; an
  LELP student's classes are its subclass probabilities summed (``lelp.class_logprobs``).
- sentence_embedding: cosine agreement (mean over held-out texts of cos(student embedding, teacher embedding); equal
  widths only) and similarity-structure agreement: Spearman's ρ between the student's and the teacher's pairwise
  cosine similarities over all held-out pairs (average ranks for ties)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.encoders import lelp, seam


def _eval_mode(*models):
    states = [m.training for m in models]
    for m in models:
        m.eval()
    return lambda: [m.train(s) for m, s in zip(models, states)]


@torch.no_grad()
def classifier_metrics(student, teacher, batches: list[dict], run) -> dict[str, float]:
    restore = _eval_mode(student, teacher)
    try:
        n, sums = 0, torch.zeros(5, dtype=torch.float64)
        for b in batches:
            ids, mask, y = b["input_ids"], b.get("attention_mask"), b["labels"][:, 1]
            s = F.linear(*seam.pooled_and_head(student, ids, mask)).float()
            t = F.linear(*seam.pooled_and_head(teacher, ids, mask)).float()
            logq = lelp.class_logprobs(s, run.subclasses.per_class) if run.subclasses is not None else s.log_softmax(-1)
            logp = t.log_softmax(-1)
            rows = torch.arange(len(y), device=y.device)
            sums += torch.stack([(logq.argmax(-1) == y).sum(), (logp.argmax(-1) == y).sum(),
                                 (logq.argmax(-1) == logp.argmax(-1)).sum(),
                                 (logp.exp() * (logp - logq)).sum(), -logq[rows, y].sum()]).double().cpu()
            n += len(y)
    finally:
        restore()
    acc, t_acc, agree, kl, ce = (sums / max(n, 1)).tolist()
    return {"accuracy": acc, "teacher_accuracy": t_acc, "agreement": agree, "kl_teacher_student": kl,
            "student_ce": ce, "examples": n}


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, tied values sharing their average rank (Spearman's convention)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    values, inverse = torch.unique(x, return_inverse=True)
    total = torch.zeros(len(values), dtype=torch.float64, device=x.device).index_add_(0, inverse, ranks)
    count = torch.zeros(len(values), dtype=torch.float64, device=x.device).index_add_(0, inverse, torch.ones_like(ranks))
    return (total / count)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def pairwise_cosines(x: Tensor) -> Tensor:
    """The n(n−1)/2 cosine similarities of distinct rows (upper triangle, row-major)."""
    x = F.normalize(x.double(), dim=-1)
    i, j = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
    return (x @ x.T)[i, j]


@torch.no_grad()
def embeddings(model, batches: list[dict]) -> Tensor:
    restore = _eval_mode(model)
    try:
        return torch.cat([seam.sentence_embeddings(model, b["input_ids"], b.get("attention_mask")).float() for b in batches])
    finally:
        restore()


def embedding_metrics(student, teacher, batches: list[dict]) -> dict[str, float]:
    s, t = embeddings(student, batches), embeddings(teacher, batches)
    metrics = {"examples": len(s)}
    if s.shape[1] == t.shape[1]:
        metrics["cosine_agreement"] = float(F.cosine_similarity(s.double(), t.double(), dim=-1).mean())
    if len(s) > 2:
        metrics["similarity_spearman"] = spearman(pairwise_cosines(s), pairwise_cosines(t))
    return metrics


def evaluate(parts, batches: list[dict]) -> dict[str, float]:
    if parts.encoder.kind == "sentence_embedding":
        return embedding_metrics(parts.student, parts.teacher, batches)
    return classifier_metrics(parts.student, parts.teacher, batches, parts.encoder)

