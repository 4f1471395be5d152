"""Teacher, student and checks for the encoder kinds (`assemble.load_parts` calls ``load_parts`` when
task.kind is not causal_lm). Both models have the teacher's tokenizer (compared by behaviour, as for causal LMs)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from potstill import models
from potstill.encoders import lelp, seam
from potstill.encoders.settings import embedding_terms
from potstill.guardrails import TokenizerMismatch, compare_tokenizers
from potstill.precision import resolve_model_dtype

log = logging.getLogger("potstill")


@dataclass
class EncoderRun:
    """What the loop needs to know about an encoder run (``Parts.encoder``)."""
    kind: str
    num_labels: int = 0  # classes (sequence_classification)
    subclasses: lelp.Subclasses | None = None  # a fitted LELP split: the student predicts classes × subclasses
    terms: list[tuple[str, float]] = field(default_factory=list)  # sentence_embedding objective


def auto_class(kind: str):
    return AutoModelForSequenceClassification if kind == "sequence_classification" else AutoModel


def load_encoder(kind: str, path: str, dtype: str, key: str) -> PreTrainedModel:
    """A classifier or a bare encoder from a local directory (or hub id), with one line naming ``key`` on failure."""
    local = Path(path).expanduser()
    if (path.startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").exists():
        raise FileNotFoundError(f"{key} {path!r}: model directory has no config.json (is the path right?)")
    try:
        return auto_class(kind).from_pretrained(str(local) if local.exists() else path, dtype=models.torch_dtype(dtype))
    except OSError as exc:
        raise FileNotFoundError(f"{key} {path!r}: not loadable as {auto_class(kind).__name__} ({exc})") from exc
    except ValueError as exc:  # e.g. a config whose model type has no sequence-classification class
        raise ValueError(f"{key} {path!r}: {' '.join(str(exc).split())[:300]}") from exc


def build_student(cfg, teacher: PreTrainedModel, tokenizer) -> PreTrainedModel:
    s, kind = cfg.student, cfg.task.kind
    if s.path:
        return load_encoder(kind, s.path, s.dtype, "student.path")
    if s.init_from_teacher_layers is not None:
        return models.truncated_copy(teacher, s.init_from_teacher_layers, same_class=True).to(models.torch_dtype(s.dtype))
    defaults = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if kind == "sequence_classification":
        defaults.update(num_labels=teacher.config.num_labels, id2label=teacher.config.id2label,
                        label2id=teacher.config.label2id)
    config = models.config_from(s.config, defaults)
    return auto_class(kind).from_config(config, dtype=models.torch_dtype(s.dtype))


def check_labels(teacher: PreTrainedModel, student: PreTrainedModel) -> int:
    t, s = teacher.config.num_labels, student.config.num_labels
    if t != s:
        raise ValueError(f"num_labels differ: teacher {t}, student {s}; the student's classes must be the teacher's "
                         "(set num_labels in student.config, or start from a student with the teacher's head)")
    return t


def check_widths(terms: list[tuple[str, float]], teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """cosine and mse compare the two embeddings coordinate by coordinate: they need one width."""
    t, s = teacher.config.hidden_size, student.config.hidden_size
    pointwise = [n for n, _ in terms if n in ("cosine", "mse")]
    if pointwise and t != s:
        raise ValueError(f"task.embedding_objective uses {', '.join(pointwise)}, which compare embeddings coordinate by "
                         f"coordinate, but the teacher's width is {t} and the student's {s}; use relation alone or a "
                         "student of the teacher's hidden_size")


def load_parts(cfg, device: torch.device, probes: list[str], student_tokenizer, held_records):
    """(tokenizer, teacher, student, output rows, EncoderRun) for `assemble.Parts`. ``probes`` (training texts for
    the tokenizer check), ``student_tokenizer`` (assemble's rule for the student's own tokenizer) and
    ``held_records`` (assemble's validation records, None = split off the training file) come from the caller, so
    this module does not import the one that imports it."""
    kind = cfg.task.kind
    teacher_path = models.resolve_model_path(cfg.teacher.path)
    tokenizer = models.load_tokenizer(teacher_path)
    teacher = load_encoder(kind, teacher_path, resolve_model_dtype(cfg.teacher.dtype, device), "teacher.path")
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, teacher, tokenizer)
    problems = compare_tokenizers(tokenizer, student_tokenizer(cfg.student.path, tokenizer), probes)
    if problems:
        raise TokenizerMismatch(f"teacher and student tokenizers differ: {'; '.join(problems)}; an encoder student "
                                "needs the teacher's tokenizer")
    teacher, student = teacher.to(device).eval().requires_grad_(False), student.to(device)
    if kind == "sentence_embedding":
        for model in (teacher, student):
            seam.mark_sentence_encoder(model, cfg.task.pooling, cfg.task.normalize)
        terms = embedding_terms(cfg.task.embedding_objective)
        check_widths(terms, teacher, student)
        return tokenizer, teacher, student, student.config.hidden_size, EncoderRun(kind, terms=terms)
    for model, key in ((teacher, "teacher.path"), (student, "student")):
        if model.config.pad_token_id is None:  # decoder classifiers pool at the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        seam.check_classifier(model, tokenizer.pad_token_id, key)
    exported = is_lelp_student(cfg, teacher, student)
    classes = teacher.config.num_labels if exported else check_labels(teacher, student)
    run = EncoderRun(kind, classes)
    if cfg.task.lelp_subclasses:
        saved = saved_subclasses(cfg, teacher) if exported else None
        run.subclasses = (saved or fit_subclasses(cfg, tokenizer, teacher, device, held_records)).to(device)
        if not exported:
            widen_student(student, cfg.task.lelp_subclasses)
    return tokenizer, teacher, student, classes * (cfg.task.lelp_subclasses or 1), run


@torch.no_grad()
def teacher_pooled(teacher: nn.Module, examples, pad_id: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's pooled vectors (N, H) and the examples' classes (N,), in eval mode."""
    from potstill.data.batches import eval_batches

    pooled, labels = [], []
    for batch in eval_batches(examples, batch_size, pad_id):
        x, _, _ = seam.pooled_and_head(teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        pooled.append(x.float().cpu())
        labels.append(batch["labels"][:, 1])
    return torch.cat(pooled), torch.cat(labels)


def is_lelp_student(cfg, teacher: PreTrainedModel, student: PreTrainedModel) -> bool:
    """Whether the student already is an LELP student of the teacher's classes (an exported run's final/): with
    task.lelp_subclasses = S, a C·S-row head named ``CLASS/s`` as ``widen_student`` names it. Its head is not widened
    again; any other head must have the teacher's C rows (``check_labels``)."""
    per_class, classes = cfg.task.lelp_subclasses, teacher.config.num_labels
    return bool(per_class) and student.config.num_labels == classes * per_class and \
        lelp.is_subclass_head(student.config.id2label, classes, per_class)


def saved_subclasses(cfg, teacher: PreTrainedModel) -> lelp.Subclasses | None:
    """The split an exported LELP student was trained against (student.path/potstill/, written at export), or None
    (with a warning) when there is none or it was fitted for another teacher: then it is refitted, as --resume does."""
    file = Path(cfg.student.path).expanduser() / "potstill" / lelp.FILE_NAME
    if not cfg.student.path or not file.exists():
        log.warning("student.path %s is an LELP student without %s; refitting the subclasses on the training texts",
                    cfg.student.path, lelp.FILE_NAME)
        return None
    saved = lelp.Subclasses.from_bytes(file.read_bytes())
    if not saved.fits(seam.classifier_head(teacher).weight.cpu(), cfg.task.lelp_subclasses):
        log.warning("%s was fitted for another teacher head (or another task.lelp_subclasses); refitting the "
                    "subclasses for teacher.path on the training texts", file)
        return None
    return saved


def fit_subclasses(cfg, tokenizer, teacher, device, held_records) -> lelp.Subclasses:
    """The teacher's subclass split, fitted on the training texts (on the CPU)."""
    from potstill.encoders.data import load_examples

    train, _ = load_examples(cfg, tokenizer, held_records, teacher.config.label2id, teacher.config.num_labels)
    h, labels = teacher_pooled(teacher, train, tokenizer.pad_token_id, cfg.eval.batch_size, device)
    head = seam.classifier_head(teacher)
    return lelp.fit(h, labels, head.weight.detach().cpu(), cfg.task.lelp_subclasses)


def widen_student(student, per_class: int) -> None:
    """Widen the student's head to classes × subclasses and name the rows ``CLASS/s``."""
    old = seam.classifier_head(student)
    lelp.replace_module(student, old, lelp.widen_head(old, per_class))
    names = student.config.id2label
    student.config.num_labels = old.out_features * per_class  # resets id2label; then name the subclasses
    student.config.id2label = lelp.subclass_names(names, old.out_features, per_class)
    student.config.label2id = {v: k for k, v in student.config.id2label.items()}
