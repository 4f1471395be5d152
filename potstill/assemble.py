"""Everything a run needs before step 1: tokenizer, teacher, student, guardrail checks and encoded data."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from potstill import lora, models
from potstill.models import load_tokenizer, resolve_model_path
from potstill.config import RunConfig
from potstill.precision import resolve_model_dtype
from potstill.crosstok.bpb import attach_token_bytes, same_bytes_problem
from potstill.data.encode import Example, encode_all
from potstill.data.loading import Record, is_builtin_spec, load_records, split_holdout
from potstill.cache.crosstok import open_cross_tokenizer_cache
from potstill.cache.opening import cached_tokenizer, open_cache
from potstill.onpolicy import self_distill
from potstill.hidden import kd as hidden_kd
from potstill.server_teacher import ServerTeacher
from potstill.multiteacher.teachers import attach as attach_teachers
from potstill.guardrails import TokenizerMismatch, check_pair, check_student_only, compare_tokenizers
from potstill.crosstok.setup import check_teacher_pair

log = logging.getLogger("potstill")


@dataclass
class Parts:
    tokenizer: object
    teacher: PreTrainedModel | None
    student: PreTrainedModel
    vocab: int  # output rows both losses use (padded rows trimmed)
    reference: PreTrainedModel | None = None  # only for the AdaSPEC-style 'reference' token selector
    cache: object | None = None  # a CacheReader when teacher signals come from teacher.cache
    server: object | None = None  # a server_teacher.ServerTeacher when they come from teacher.server_url
    crosstok: object | None = None  # a crosstok.setup.CrossTokenizerRun when the teacher has its own tokenizer
    teachers: object | None = None  # a multiteacher.teachers.MultiTeacher when teachers.extra lists more teachers
    hidden: object | None = None  # a hidden.kd.HiddenKD when the run distils hidden states (hidden.*)
    encoder: object | None = None  # encoders.assemble.EncoderRun for task.kind sequence_classification / sentence_embedding


def build_student(cfg: RunConfig, teacher: PreTrainedModel | None, tokenizer) -> PreTrainedModel:
    """The student as configured; with student.lora.r > 0, wrapped with LoRA adapters (its own weights frozen)."""
    return lora.adapt(_base_student(cfg, teacher, tokenizer), cfg.student.lora)


def _base_student(cfg: RunConfig, teacher: PreTrainedModel | None, tokenizer) -> PreTrainedModel:
    s = cfg.student
    if s.path:
        return models.load_causal_lm(s.path, s.dtype, "student.path")
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
    """Teacher (unless signals come from a cache), student, tokenizer and the guardrail checks between them; with
    teachers.extra, the other teachers too (multiteacher/teachers.py)."""
    if cfg.task.kind != "causal_lm":  # classifiers and sentence encoders (encoders/assemble.py)
        from potstill.encoders.assemble import load_parts as load_encoder_parts

        tokenizer, teacher, student, rows, run = load_encoder_parts(cfg, device, probe_texts(cfg), student_tokenizer,
                                                                    _held_out_records(cfg))
        return Parts(tokenizer, teacher, student, rows, encoder=run)
    return attach_teachers(cfg, _load_first_teacher_parts(cfg, device), device, probe_texts(cfg))


def _load_first_teacher_parts(cfg: RunConfig, device: torch.device) -> Parts:
    if cfg.teacher.cache:
        return _load_cached_parts(cfg, device)
    if cfg.teacher.server_url:
        return _load_server_parts(cfg, device)
    teacher = tokenizer = None
    teacher_dtype = resolve_model_dtype(cfg.teacher.dtype, device)
    if cfg.teacher.path:
        teacher_path = resolve_model_path(cfg.teacher.path)
        teacher = models.load_causal_lm(teacher_path, teacher_dtype, "teacher.path").to(device).eval().requires_grad_(False)
        tokenizer = load_tokenizer(teacher_path)
    student_tok_path = cfg.student.path if cfg.student.path else None
    own_tok = load_tokenizer(cfg.student.tokenizer) if cfg.student.tokenizer else None  # a fresh student's own
    torch.manual_seed(cfg.train.seed)  # the same seed gives the same fresh student, whatever the objective
    student = build_student(cfg, teacher, own_tok or tokenizer).to(device)
    student_tok = own_tok or student_tokenizer(student_tok_path, tokenizer)
    crosstok = None
    if teacher is not None:  # different tokenizers: refused, or cross-tokenizer KD (crosstok/setup.py)
        vocab, crosstok = check_teacher_pair(cfg, cfg.objective(), tokenizer, student_tok, teacher, student,
                                             probe_texts(cfg), cfg.loss.chunk_size)
    else:
        vocab = check_student_only(student_tok, student)
    reference = None
    if cfg.loss.reference:
        reference = models.load_causal_lm(cfg.loss.reference, teacher_dtype, "loss.reference").to(device).eval().requires_grad_(False)
        check_pair(tokenizer, student_tokenizer(cfg.loss.reference, tokenizer), teacher, reference, probe_texts(cfg))
    # The data is encoded as the teacher reads it; the checks above make the student's tokenizer equivalent
    # (across tokenizers: the student's, aligned with the teacher's at encode time).
    teacher = teacher if teacher is not None else self_distill.student_copy(cfg, student)  # teacher.self_distill
    data_tok = student_tok if crosstok is not None or tokenizer is None else tokenizer
    return Parts(data_tok, teacher, student, vocab, reference, crosstok=crosstok,
                 hidden=hidden_kd.build(cfg, teacher, student))


def _load_cached_parts(cfg: RunConfig, device: torch.device) -> Parts:
    """With teacher.cache the cache supplies every teacher signal and the tokenizer saved with it stands in for the
    teacher's. The teacher's weights are read only for student.init_from_teacher_layers (on the CPU, then freed)."""
    tokenizer = cached_tokenizer(cfg.teacher.cache)
    own_tok = load_tokenizer(cfg.student.tokenizer) if cfg.student.tokenizer else None  # a fresh student's own
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, _teacher_to_copy(cfg), own_tok or tokenizer).to(device)
    student_tok = own_tok or student_tokenizer(cfg.student.path, tokenizer)
    problems = compare_tokenizers(tokenizer, student_tok, probe_texts(cfg))
    if problems and cfg.objective().crosstok_terms:  # a student with another tokenizer (cache/crosstok.py)
        vocab, crosstok = open_cross_tokenizer_cache(cfg, tokenizer, student_tok, student, problems)
        return Parts(student_tok, None, student, vocab, crosstok=crosstok)
    if problems:
        raise TokenizerMismatch(f"the student's tokenizer differs from the one the cache was built with: {'; '.join(problems)}")
    vocab = check_student_only(student_tok, student)
    return Parts(tokenizer, None, student, vocab, None, open_cache(cfg, tokenizer, vocab))


def _load_server_parts(cfg: RunConfig, device: torch.device) -> Parts:
    """With teacher.server_url the server supplies every teacher signal (potstill/server_teacher.py); the tokenizer is
    teacher.path's (tokenizer files only) or the student's, the teacher's weights read only as in a cached run."""
    tokenizer = load_tokenizer(resolve_model_path(cfg.teacher.path)) if cfg.teacher.path else None
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, _teacher_to_copy(cfg), tokenizer).to(device)
    student_tok = student_tokenizer(cfg.student.path, tokenizer)
    problems = compare_tokenizers(tokenizer, student_tok, probe_texts(cfg)) if tokenizer is not None else []
    if problems:
        raise TokenizerMismatch(f"the student's tokenizer differs from teacher.path's: {'; '.join(problems)}")
    vocab = check_student_only(student_tok, student)
    return Parts(tokenizer or student_tok, None, student, vocab, server=ServerTeacher.from_config(cfg))


def _teacher_to_copy(cfg: RunConfig) -> PreTrainedModel | None:
    """The teacher on the CPU when the student is its first N layers (a cached run never runs it), else None."""
    if cfg.student.init_from_teacher_layers is None:
        return None
    cpu_dtype = resolve_model_dtype(cfg.teacher.dtype, torch.device("cpu"))
    return models.load_causal_lm(resolve_model_path(cfg.teacher.path), cpu_dtype).eval()


def probe_texts(cfg: RunConfig, n: int = 8) -> list[str]:
    """A few of the run's own training texts, for the tokenizer behaviour check (all fields of a record)."""
    texts = []
    for _, record in load_records(cfg.data.train, "train", n):
        if "messages" in record:
            texts += [str(m.get("content", "")) for m in record["messages"]]
        else:
            texts += [str(record[k]) for k in ("text", "prompt", "completion") if k in record]
    return texts


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def student_tokenizer(path: str | None, teacher_tok):
    """The student's own tokenizer when its directory (or hub repo) has one, else the teacher's. A local directory
    without tokenizer files must not be handed to AutoTokenizer: for some model types it silently builds an empty
    default tokenizer instead of failing."""
    local = Path(path).expanduser() if path else None
    if path and not (local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES)):
        try:
            return load_tokenizer(path)
        except (OSError, ValueError):
            if teacher_tok is None:
                raise ValueError(f"student {path!r} has no tokenizer and there is no teacher to borrow one from") from None
    if teacher_tok is None:
        raise ValueError("no tokenizer: give teacher.path, or a student.path that contains a tokenizer")
    return teacher_tok


def _held_out_records(cfg: RunConfig) -> list[Record] | None:
    """Explicit or built-in validation records (a built-in source's own validation stream); None when they must be
    split off the training file."""
    d = cfg.data
    if d.validation:
        return load_records(d.validation, "validation")
    return load_records(d.train, "validation") if is_builtin_spec(d.train) else None


def load_examples(cfg: RunConfig, tokenizer, train: bool = True, annotate=None) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples; with ``train=False`` only what evaluation needs is read and encoded;
    ``annotate`` is encode_all's per-example hook (cross-tokenizer alignment).
    Example ids are record positions in their file, whatever is split off or limited (see data/loading.py);
    truncation and drops are logged (INFO, logger "potstill") per source."""
    if cfg.task.kind != "causal_lm":  # {"text", "label"} records, one labelled position per text (encoders/data.py)
        from potstill.encoders.data import load_examples as load_encoder_examples

        return load_encoder_examples(cfg, tokenizer, _held_out_records(cfg), train=train)
    d = cfg.data
    held_records = _held_out_records(cfg)
    train_records: list[Record] = []
    if train or held_records is None:
        train_records = load_records(d.train, "train", d.max_train_examples)
    if held_records is None:
        train_records, held_records = split_holdout(train_records)
    train_examples: list[Example] = []
    if train:
        train_examples, stats = encode_all(tokenizer, train_records, d.max_length, d.train, annotate)
        log.info(stats.summary("training"))
    held, stats = encode_all(tokenizer, held_records[: d.max_eval_examples], d.max_length, d.validation or d.train,
                             annotate)
    attach_token_bytes(tokenizer, held, held_records[: d.max_eval_examples], d.validation or d.train)  # bits per byte
    log.info(stats.summary("held-out"))
    return train_examples, held


def teacher_held_out(cfg: RunConfig, parts: Parts, held: list[Example]) -> tuple[list[Example], int]:
    """A live cross-tokenizer run's held-out records encoded with the TEACHER's tokenizer, for its bits per byte
    beside the student's (crosstok/bpb.py), and that tokenizer's pad id; no examples for any other run, or (logged)
    when the two encodings do not score the same bytes."""
    if parts.crosstok is None or parts.teacher is None:  # one tokenizer (evaluate compares per token), or a cache
        return [], 0
    teacher_tok = parts.crosstok.aligner.teacher_tokenizer
    _, teacher_held = load_examples(cfg, teacher_tok, train=False)
    problem = same_bytes_problem(held, teacher_held)
    if problem:
        log.warning("teacher_bpb off: %s", problem)
        return [], 0
    return teacher_held, teacher_tok.pad_token_id


def load_cacheable_examples(cfg: RunConfig, tokenizer) -> list[Example]:
    """Every record of the training file (the first ``data.max_train_examples``), with no hold-out carved off: a
    cache built over them serves a run that splits its validation off the file and one given ``data.validation``
    alike (ids are file positions, so each run finds its own examples)."""
    d = cfg.data
    examples, stats = encode_all(tokenizer, load_records(d.train, "train", d.max_train_examples), d.max_length, d.train)
    log.info(stats.summary("cached"))
    return examples

