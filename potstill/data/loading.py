"""Reading training data into plain records (dicts), with errors that name the file and the line.

Formats: JSONL (one object per line), Parquet, a directory saved by HF ``datasets`` (``save_to_disk``), or
``builtin`` (the seeded source shipped with potstill). A record holds ``text``, or ``prompt``/``completion``,
or chat ``messages`` ([{role, content}, ...]).
"""
from __future__ import annotations

from pathlib import Path

from potstill.io import iter_jsonl

RECORD_KINDS = ("text", "prompt/completion", "messages")


def record_kind(record: dict, where: str) -> str:
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt/completion"
    if "text" in record:
        return "text"
    raise ValueError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages'; got keys {sorted(record)}")


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        record_kind(obj, f"{path}:{lineno}")
        records.append(obj)
    return records


def read_table(path: Path) -> list[dict]:
    """Parquet files and saved ``datasets`` directories, via the datasets library."""
    import datasets

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
    else:
        ds = datasets.Dataset.from_parquet(str(path))
    records = ds.to_list()
    for i, rec in enumerate(records[:1]):
        record_kind(rec, f"{path}: row {i}")
    return records


def load_records(spec: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Records from a data spec: a path, or ``builtin`` (split chooses train/validation/test)."""
    if spec == "builtin":
        from potstill.builtin import builtin_texts

        records = [{"text": t} for t in builtin_texts(split, limit)]
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix == ".jsonl" or path.suffix == ".json":
            records = read_jsonl(path)
        elif path.suffix == ".parquet" or path.is_dir():
            records = read_table(path)
        else:
            raise ValueError(f"{path}: unknown data format; use .jsonl, .parquet or a datasets directory")
        if not records:
            raise ValueError(f"{path}: the dataset is empty")
    return records[:limit] if limit is not None else records


def split_holdout(records: list[dict], fraction: float = 0.02) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out: every k-th record goes to validation (no RNG, so resumes see the same split)."""
    if len(records) < 2:
        raise ValueError("need at least 2 training records to hold some out for evaluation; set data.validation")
    every = max(2, round(1 / fraction))
    held = [i % every == every - 1 for i in range(len(records))]
    if not any(held):
        held[-1] = True
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]
