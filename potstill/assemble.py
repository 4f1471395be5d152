"""Everything a run needs before step 1: tokenizer, teacher, student, guardrail checks and encoded data."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoTokenizer, PreTrainedModel

from potstill import models
from potstill.config import RunConfig
from potstill.data.encode import Example, encode_all
from potstill.data.loading import load_records, split_holdout
from potstill.guardrails import check_pair, check_student_only


@dataclass
class Parts:
    tokenizer: object
    teacher: PreTrainedModel | None
    student: PreTrainedModel
    vocab: int  # output rows both losses use (padded rows trimmed)
    reference: PreTrainedModel | None = None  # only for the AdaSPEC-style 'reference' token selector


def resolve_model_path(path: str) -> str:
    if path == "builtin":
        from potstill.builtin.teacher import builtin_teacher_dir

        return str(builtin_teacher_dir())
    return path


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:  # batching needs a pad id; padded positions never get a label
        tok.pad_token = tok.eos_token
    return tok


def build_student(cfg: RunConfig, teacher: PreTrainedModel | None, tokenizer) -> PreTrainedModel:
    s = cfg.student
    if s.path:
        return models.load_causal_lm(s.path, s.dtype)
    if s.init_from_teacher_layers is not None:
        if teacher is None:
            raise ValueError("student.init_from_teacher_layers needs teacher.path")
        return models.truncated_copy(teacher, s.init_from_teacher_layers).to(models.torch_dtype(s.dtype))
    config = s.config
    if isinstance(config, dict):  # fill what the tokenizer already determines
        defaults = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                    "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        config = {**defaults, **config}
    return models.model_from_config(config, s.dtype)


def load_parts(cfg: RunConfig, device: torch.device) -> Parts:
    teacher = tokenizer = None
    if cfg.teacher.path:
        teacher_path = resolve_model_path(cfg.teacher.path)
        teacher = models.load_causal_lm(teacher_path, cfg.teacher.dtype).to(device).eval().requires_grad_(False)
        tokenizer = load_tokenizer(teacher_path)
    student_tok_path = cfg.student.path if cfg.student.path else None
    torch.manual_seed(cfg.train.seed)  # the same seed gives the same fresh student, whatever the objective
    student = build_student(cfg, teacher, tokenizer).to(device)
    student_tok = _student_tokenizer(student_tok_path, tokenizer)
    if teacher is not None:
        vocab = check_pair(tokenizer, student_tok, teacher, student)
    else:
        vocab = check_student_only(student_tok, student)
    reference = None
    if cfg.loss.reference:
        reference = models.load_causal_lm(cfg.loss.reference, cfg.teacher.dtype).to(device).eval().requires_grad_(False)
        check_pair(tokenizer, _student_tokenizer(cfg.loss.reference, tokenizer), teacher, reference)
    return Parts(student_tok, teacher, student, vocab, reference)


def _student_tokenizer(path: str | None, teacher_tok):
    if path:
        try:
            return load_tokenizer(path)
        except (OSError, ValueError):
            if teacher_tok is None:
                raise ValueError(f"student {path!r} has no tokenizer and there is no teacher to borrow one from") from None
    if teacher_tok is None:
        raise ValueError("no tokenizer: give teacher.path, or a student.path that contains a tokenizer")
    return teacher_tok


def _held_out_records(cfg: RunConfig) -> list[dict] | None:
    """Explicit or built-in validation records; None when they must be split off the training file."""
    d = cfg.data
    if d.validation:
        return load_records(d.validation, "validation")
    return load_records("builtin", "validation") if d.train == "builtin" else None


def load_examples(cfg: RunConfig, tokenizer, train: bool = True) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples; with ``train=False`` only what evaluation needs is read and encoded."""
    d = cfg.data
    held_records = _held_out_records(cfg)
    train_records: list[dict] = []
    if train or held_records is None:
        train_records = load_records(d.train, "train", d.max_train_examples)
    if held_records is None:
        train_records, held_records = split_holdout(train_records)
    train_examples = encode_all(tokenizer, train_records, d.max_length, d.train) if train else []
    held = encode_all(tokenizer, held_records[: d.max_eval_examples], d.max_length, d.validation or d.train)
    return train_examples, held
