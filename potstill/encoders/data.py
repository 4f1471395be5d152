"""Records → examples for the encoder kinds, in the loop's layout of one labelled "token" per text.

A sequence-classification record is {"text": str, "label": int | name}; a sentence-embedding record is {"text": str}.
The text is tokenised with the tokenizer's special tokens ([CLS] … [SEP], or BOS …) and nothing appended. The label
goes at position 1 of an otherwise ignored label row, so the loop's shift (`train.shifted`: labels[:, 1:]) puts it
at position 0, where the seam (encoders/seam.py) puts the pooled vector: every step counts one valid position per
text and the fused loss normalises by the number of texts. A sentence-embedding example carries label 0 there (the
count, nothing to predict)."""
from __future__ import annotations

import logging

from potstill.data.encode import EncodeStats, Example
from potstill.data.loading import Record, load_records, record_location, split_holdout
from potstill.labels import IGNORE_INDEX

log = logging.getLogger("potstill")


def class_index(label, label2id: dict[str, int], num_labels: int, where: str) -> int:
    """A record's label as a class index: an int in [0, num_labels), or a name in the teacher's label2id."""
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"{where}: 'label' must be a class index or a class name, got {type(label).__name__}")
    if isinstance(label, str):
        if label not in label2id:
            raise ValueError(f"{where}: label {label!r} is not one of the teacher's classes "
                             f"({', '.join(sorted(label2id)) or 'none named'})")
        return label2id[label]
    if not 0 <= label < num_labels:
        raise ValueError(f"{where}: label {label} is out of range for num_labels={num_labels} (use 0..{num_labels - 1})")
    return label


def encode_record(tokenizer, record: dict, where: str, max_length: int, label: int) -> tuple[Example | None, bool]:
    """(example or None when the text has no token, whether it was truncated)."""
    text = record.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: needs a 'text' string, got keys {sorted(record)}")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    if len(ids) < 2:  # position 1 carries the label (see the module docstring)
        if not text.strip():
            return None, False
        raise ValueError(f"{where}: {len(ids)} token(s); a text needs ≥ 2 (raise data.max_length)")
    labels = [IGNORE_INDEX] * len(ids)
    labels[1] = label
    return Example(0, ids, labels), truncated


def encode_records(tokenizer, records: list[Record], source: str, max_length: int, kind: str,
                   label2id: dict[str, int], num_labels: int) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats(source, max_length)
    examples = []
    for number, record in records:
        where = record_location(source, number)
        if kind == "sequence_classification":
            if "label" not in record:
                raise ValueError(f"{where}: a sequence_classification record needs 'label'; got keys {sorted(record)}")
            label = class_index(record["label"], label2id, num_labels, where)
        else:
            label = 0
        example, truncated = encode_record(tokenizer, record, where, max_length, label)
        if example is None:
            stats.dropped_empty += 1
            continue
        example.example_id = number
        examples.append(example)
        stats.kept += 1
        stats.truncated += truncated
    return examples, stats


def teacher_classes(cfg) -> tuple[dict[str, int], int]:
    """The teacher's label2id and num_labels (its config.json), which record labels are checked against."""
    from transformers import AutoConfig

    from potstill.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.teacher.path))
    return dict(config.label2id), config.num_labels


def load_examples(cfg, tokenizer, held_records: list[Record] | None, label2id: dict[str, int] | None = None,
                  num_labels: int = 0, train: bool = True) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples of an encoder run; the same sources and split rules as assemble.load_examples
    (``held_records``: its validation records, None = split them off the training file). Labels are checked
    against the teacher's classes (read from its config unless given)."""
    if label2id is None and cfg.task.kind == "sequence_classification":
        label2id, num_labels = teacher_classes(cfg)
    d = cfg.data
    train_records = load_records(d.train, "train", d.max_train_examples) if train or held_records is None else []
    if held_records is None:
        train_records, held_records = split_holdout(train_records)
    kind = cfg.task.kind
    train_examples: list[Example] = []
    if train:
        train_examples, stats = encode_records(tokenizer, train_records, d.train, d.max_length, kind, label2id, num_labels)
        log.info(stats.summary("training"))
    held, stats = encode_records(tokenizer, held_records[: d.max_eval_examples], d.validation or d.train, d.max_length,
                                 kind, label2id, num_labels)
    log.info(stats.summary("held-out"))
    return train_examples, held
