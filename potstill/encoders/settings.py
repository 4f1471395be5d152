"""The `task.*` config section: which kind of model pair a run distils, and the encoder regimes' options.

Kept here (imported by config.py) so the checks name their keys next to what they mean. Light imports only: the
config module loads this before any model code."""
from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("causal_lm", "sequence_classification", "sentence_embedding")
EMBEDDING_TERMS = ("cosine", "mse", "relation")
POOLINGS = ("mean", "cls")
_TERM = re.compile(r"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[a-z_]+)\s*$")


@dataclass
class TaskConfig:
    kind: str = "causal_lm"
    """What teacher and student are: causal_lm (next-token distillation), sequence_classification (AutoModelForSequenceClassification teacher and student; records {"text", "label"}; the class logits go through the fused loss) or sentence_embedding (encoders pooled to one vector per text; records {"text"}) (docs/encoders.md)."""
    lelp_subclasses: int = 0
    """sequence_classification: LELP pseudo-subclasses per class (0 = off, else ≥ 2): the student's head is widened to classes × subclasses and distilled to the teacher's pseudo-subclass distribution (docs/encoders.md)."""
    embedding_objective: str = "cosine"
    """sentence_embedding: weighted sum of `cosine` (1 − cos per text), `mse` (mean squared difference over the embedding's features, per text) and `relation` (per text, the mean squared difference between its rows of the micro-batch's student and teacher cosine-similarity matrices), e.g. `cosine + 0.5*relation`."""
    pooling: str = "mean"
    """sentence_embedding: mean (over non-pad tokens, as sentence-transformers' Pooling) or cls (the first token)."""
    normalize: bool = True
    """sentence_embedding: L2-normalise pooled embeddings (sentence-transformers' Normalize) before the objective and evaluation."""


def embedding_terms(spec: str) -> list[tuple[str, float]]:
    """`cosine + 0.5*relation` → [("cosine", 1.0), ("relation", 0.5)]; one line naming the key on a bad spec."""
    terms = []
    for part in spec.split("+"):
        m = _TERM.match(part)
        if not m or m["name"] not in EMBEDDING_TERMS:
            raise ValueError(f"task.embedding_objective={spec!r}: {part.strip()!r} is not a term; use a weighted sum of "
                             f"{', '.join(EMBEDDING_TERMS)} (e.g. 'cosine + 0.5*relation')")
        try:
            weight = float(m["w"]) if m["w"] else 1.0
        except ValueError:
            raise ValueError(f"task.embedding_objective={spec!r}: bad weight {m['w']!r}") from None
        if not weight > 0:
            raise ValueError(f"task.embedding_objective={spec!r}: weights must be > 0, got {weight:g}")
        terms.append((m["name"], weight))
    names = [n for n, _ in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"task.embedding_objective={spec!r}: a term appears twice")
    return terms


# Settings of the causal-LM run that an encoder run has no use for: one line each, naming the key.
_CAUSAL_ONLY = (
    ("teacher.cache", lambda c: c.teacher.cache, "a teacher cache stores next-token signals"),
    ("teacher.server_url", lambda c: c.teacher.server_url, "a server teacher scores tokens"),
    ("teacher.self_distill", lambda c: c.teacher.self_distill != "none", "self-distillation reads privileged context"),
    ("data.regime", lambda c: c.data.regime != "offline", "rollouts are generated text"),
    ("data.packing", lambda c: c.data.packing, "a pooled representation needs one text per row"),
    ("student.lora.r", lambda c: c.student.lora.r > 0, "LoRA students are causal LMs here"),
    ("loss.select", lambda c: c.loss.select, "token selection weighs positions of a sequence"),
    ("loss.reference", lambda c: c.loss.reference, "the reference selector is token-level"),
    ("eval.early_stop", lambda c: c.eval.early_stop != "none", "golden metrics are next-token metrics"),
)


def check_settings(cfg) -> None:
    """The task.* keys, and what an encoder run refuses, checked at config load (one line each)."""
    t = cfg.task
    if t.kind not in KINDS:
        raise ValueError(f"task.kind={t.kind!r}: use {', '.join(KINDS)}")
    if t.lelp_subclasses < 0 or t.lelp_subclasses == 1:
        raise ValueError(f"task.lelp_subclasses must be 0 (off) or ≥ 2, got {t.lelp_subclasses}")
    if t.lelp_subclasses and t.kind != "sequence_classification":
        raise ValueError("task.lelp_subclasses is an option of task.kind=sequence_classification")
    if t.pooling not in POOLINGS:
        raise ValueError(f"task.pooling={t.pooling!r}: use {' or '.join(POOLINGS)}")
    embedding_terms(t.embedding_objective)
    if t.kind == "causal_lm":
        return
    for key, is_set, why in _CAUSAL_ONLY:
        if is_set(cfg):
            raise ValueError(f"{key} is not supported with task.kind={t.kind} ({why}); remove it")
    if not cfg.teacher.path:
        raise ValueError(f"task.kind={t.kind} needs teacher.path (a live teacher)")
    if t.kind == "sentence_embedding" and cfg.loss.objective != "fkl":
        raise ValueError("task.kind=sentence_embedding takes its objective from task.embedding_objective; leave "
                         f"loss.objective unset (got {cfg.loss.objective!r})")
    if t.lelp_subclasses and any(term.uses_labels for term in cfg.objective().terms):
        raise ValueError("task.lelp_subclasses: the student predicts pseudo-subclasses and a hard label names a "
                         "class, so label terms (ce) do not apply; use teacher terms only (e.g. loss.objective=fkl)")
