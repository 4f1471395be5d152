"""Reading training data into numbered records, with errors that name the file and the line.

Formats: JSONL (one object per line), Parquet, a directory saved by HF ``datasets`` (``save_to_disk``), or
``builtin`` / ``builtin:<name>`` (the seeded sources shipped with potstill: grammar texts, arithmetic, see
``builtin/sources.py``). A record holds ``text``, or ``prompt``/``completion``,
or chat ``messages`` ([{role, content}, ...]).

Every record keeps its position in its source as its number (the example id downstream): the 0-based line index
for JSONL (line number − 1; blank lines are skipped, never renumbered), the row for tables, the index in the
built-in split. Splitting off validation records or limiting the count never renumbers, so a teacher cache built
over a file and a run over the same file agree on every example's id.
"""
from __future__ import annotations

from pathlib import Path

from potstill.io import iter_jsonl


def is_builtin_spec(spec: str | None) -> bool:
    """``builtin`` or ``builtin:<name>`` (the seeded sources in ``potstill/builtin/sources.py``)."""
    return spec is not None and (spec == "builtin" or spec.startswith("builtin:"))

RECORD_KINDS = ("text", "prompt/completion", "messages")
Record = tuple[int, dict]  # (position in its source, fields)


def record_kind(record: dict, where: str) -> str:
    """Which of the three record kinds this is; fields of the wrong type fail here, naming the record."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
        return "messages"
    if "prompt" in record and "completion" in record:
        _require_text(record, ("prompt", "completion"), where)
        return "prompt/completion"
    if "text" in record:
        _require_text(record, ("text",), where)
        return "text"
    raise ValueError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages'; got keys {sorted(record)}")


def _require_text(record: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")


def record_location(source: str, number: int) -> str:
    """Where record ``number`` of ``source`` is, for error messages: ``file.jsonl:LINE`` or ``source: record N``."""
    if Path(source).suffix in (".jsonl", ".json"):
        return f"{source}:{number + 1}"
    return f"{source}: record {number}"


def read_jsonl(path: Path) -> list[Record]:
    records = []
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        record_kind(obj, f"{path}:{lineno}")
        records.append((lineno - 1, obj))
    return records


def read_table(path: Path) -> list[Record]:
    """Parquet files and saved ``datasets`` directories, via the datasets library. Columns a row leaves empty
    (None) are dropped, so a table mixing record kinds reads each row as its own kind."""
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
        else:
            ds = datasets.Dataset.from_parquet(str(path))
        rows = ds.to_list()
    except Exception as exc:  # pyarrow, datasets and OS errors alike: say which file could not be read
        kind = "a saved datasets directory" if path.is_dir() else "Parquet"
        raise ValueError(f"{path}: cannot be read as {kind} ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    records = [(i, {k: v for k, v in row.items() if v is not None}) for i, row in enumerate(rows)]
    for i, rec in records[:1]:
        record_kind(rec, f"{path}: row {i}")
    return records


def load_records(spec: str, split: str = "train", limit: int | None = None) -> list[Record]:
    """Numbered records from a data spec: a path, or a built-in source (split chooses train/validation/test)."""
    if is_builtin_spec(spec):
        from potstill.builtin.sources import builtin_records

        records = builtin_records(spec, split, limit)
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


def split_holdout(records: list[Record], fraction: float = 0.02) -> tuple[list[Record], list[Record]]:
    """Deterministic hold-out: every k-th record goes to validation (no RNG, so resumes see the same split).
    Records keep their numbers, so training ids have gaps where validation records were."""
    if len(records) < 2:
        raise ValueError("need at least 2 training records to hold some out for evaluation; set data.validation")
    every = max(2, round(1 / fraction))
    held = [i % every == every - 1 for i in range(len(records))]
    if not any(held):
        held[-1] = True
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]
