"""Small file helpers shared by every writer and reader: atomic replacement and line-numbered JSONL."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temporary name in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    """One line as text; a byte that is not UTF-8 fails naming file, line and column (a leading BOM is dropped)."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                         "save the file as UTF-8") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; malformed JSON or bad UTF-8 raises naming file and line.

    Lines are split on b"\\n" and decoded one by one (UTF-8 never uses that byte inside a character), so a decoding
    error knows its line."""
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode_line(path, lineno, raw)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); fix or remove the line") from None
