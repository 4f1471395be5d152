"""The encoder kinds' hooks into the one loop (train.py calls these; nothing else of the loop changes):
the teacher target of a batch, the loss of a sentence-embedding batch, the held-out evaluation, the files exported
beside the final student."""
from __future__ import annotations

from potstill.encoders import evaluation, lelp
from potstill.encoders.embedding import embedding_loss
from potstill.losses.targets import DenseLogits


def is_encoder_run(parts) -> bool:
    return getattr(parts, "encoder", None) is not None


def is_embedding_run(parts) -> bool:
    return is_encoder_run(parts) and parts.encoder.kind == "sentence_embedding"


def teacher_target(parts, signal):
    """A classifier teacher's signal as it is (C class logits through its head), or with LELP its pseudo-subclass
    logits (N, C·S) as dense logits."""
    if parts.encoder.subclasses is None:
        return signal
    return DenseLogits(parts.encoder.subclasses.subclass_logits(signal.hidden, signal.weight, signal.bias))


def final_files(parts) -> dict[str, bytes]:
    """Files for final/potstill/: an LELP run's fitted subclasses, which evaluating or continuing from the exported
    student reloads (encoders/assemble.saved_subclasses)."""
    if not is_encoder_run(parts) or parts.encoder.subclasses is None:
        return {}
    return {lelp.FILE_NAME: parts.encoder.subclasses.to_bytes()}


def batch_loss(par, batch: dict, objective, amp):
    return embedding_loss(par, batch, objective, amp)


def run_eval(parts, batches: list[dict], step: int) -> dict:
    return {"step": step, "kind": "eval", **evaluation.evaluate(parts, batches)}


def headline(metrics: dict) -> str:
    """The progress note of an evaluation."""
    if "student_ce" in metrics:
        return f"held-out CE {metrics['student_ce']:.4f}"
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("cosine_agreement", "similarity_spearman") if k in metrics)
