"""The output of `potstill generate`: an append-only JSONL file that a rerun resumes.

Files, for ``generate.out = OUT``:
- ``OUT``: one kept completion per line, appended and flushed as it arrives;
- ``OUT.rejected.jsonl``: ``{"prompt_id", "sample", "reason"}`` for each filtered completion, so a rerun does not
  draw it again;
- ``OUT.meta.json``: the settings that determine the content (backend, model, data, sampling, seed, filters),
  written before the first line. A rerun whose settings differ is refused, naming each difference, unless
  ``--overwrite``.

A process killed mid-write leaves at most a partial last line (no trailing newline): it is cut off on reopening,
never parsed. Any other malformed line is an error naming the file and line. One writer at a time (an exclusive
``flock`` on OUT).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from potstill.io import atomic_write_text, iter_jsonl

log = logging.getLogger("potstill.generate")


def sidecars(out: Path) -> tuple[Path, Path]:
    """(meta, rejected) paths of an output file."""
    return out.with_name(out.name + ".meta.json"), out.with_name(out.name + ".rejected.jsonl")


@dataclass
class Progress:
    """What the files already hold: finished (prompt_id, sample) pairs and each prompt's kept completions."""
    done: set[tuple[int, int]] = field(default_factory=set)
    kept_texts: dict[int, set[str]] = field(default_factory=dict)
    lines: int = 0


def cut_partial_last_line(path: Path) -> bool:
    """Truncate ``path`` after its last newline; True if there was a partial line (an interrupted write)."""
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return False
        end, position = 0, size  # end stays 0 when the only line is partial
        while position > 0:  # scan back in blocks: the file may be large
            step = min(1 << 16, position)
            position -= step
            fh.seek(position)
            newline = fh.read(step).rfind(b"\n")
            if newline >= 0:
                end = position + newline + 1
                break
    os.truncate(path, end)
    log.warning("%s: dropped a partial last line (%d bytes, an interrupted write); it will be generated again",
                path, size - end)
    return True


def _pair(obj: object, path: Path, lineno: int) -> tuple[int, int]:
    if not (isinstance(obj, dict) and isinstance(obj.get("prompt_id"), int) and isinstance(obj.get("sample"), int)):
        raise ValueError(f"{path}:{lineno}: not a potstill generate line (needs integer prompt_id and sample); "
                         "use another generate.out or --overwrite")
    return obj["prompt_id"], obj["sample"]


def _completion_of(obj: dict) -> str:
    if "completion" in obj:
        return obj["completion"]
    return obj["messages"][-1]["content"]


class Output:
    """Open with ``with Output(path, settings, overwrite) as out:``; ``out.progress`` says what is done."""

    def __init__(self, path: str | Path, settings: dict, overwrite: bool = False):
        self.path = Path(path).expanduser()
        self.meta, self.rejected_path = sidecars(self.path)
        self.settings, self.overwrite = settings, overwrite
        self.progress = Progress()

    def __enter__(self) -> "Output":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._kept = self.path.open("ab")
        try:
            fcntl.flock(self._kept.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._kept.close()
            raise RuntimeError(f"{self.path}: another potstill generate is writing this file") from None
        try:
            self._prepare()
            self._rejected = self.rejected_path.open("ab")
        except BaseException:
            self._kept.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._rejected.close()
        self._kept.close()

    def _prepare(self) -> None:
        """Start fresh (new file or --overwrite) or check the settings and read what is done."""
        fresh = self.overwrite or (self.path.stat().st_size == 0 and not self.rejected_path.exists())
        if fresh:
            os.truncate(self.path, 0)
            self.rejected_path.unlink(missing_ok=True)
            atomic_write_text(self.meta, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
            return
        self._check_settings()
        for path in (self.path, self.rejected_path):
            if path.exists():
                cut_partial_last_line(path)
        for lineno, obj in iter_jsonl(self.path):
            pair = _pair(obj, self.path, lineno)
            self.progress.done.add(pair)
            self.progress.kept_texts.setdefault(pair[0], set()).add(_completion_of(obj))
            self.progress.lines += 1
        if self.rejected_path.exists():
            for lineno, obj in iter_jsonl(self.rejected_path):
                self.progress.done.add(_pair(obj, self.rejected_path, lineno))

    def _check_settings(self) -> None:
        if not self.meta.exists():
            raise ValueError(f"{self.path} exists but has no {self.meta.name} (not written by potstill generate?); "
                             "use another generate.out, or --overwrite to replace it")
        old = json.loads(self.meta.read_text())
        changed = [f"{key}: {old.get(key)!r} → {self.settings.get(key)!r}"
                   for key in sorted(set(old) | set(self.settings)) if old.get(key) != self.settings.get(key)]
        if changed:
            raise ValueError(f"{self.path} was generated with other settings ({'; '.join(changed)}); rerun with the "
                             "old settings to resume it, or use --overwrite to start over")

    def keep(self, line: dict) -> None:
        self._append(self._kept, line)
        self.progress.lines += 1

    def reject(self, prompt_id: int, sample: int, reason: str) -> None:
        self._append(self._rejected, {"prompt_id": prompt_id, "sample": sample, "reason": reason})

    @staticmethod
    def _append(fh, obj: dict) -> None:
        """One whole line per write call, flushed: a crash leaves at most a partial last line."""
        fh.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        fh.flush()
