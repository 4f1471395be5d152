"""The ``teachers.*`` section (`TeachersConfig`) and its checks at config load (one line each, naming the key)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TeachersConfig:
    extra: list | None = None
    """Multi-teacher KD (docs/multi-teacher.md): more teachers besides teacher.path / teacher.cache, a list of mappings {name, path | cache, weight (default 1)}: a live model (HF dir, hub id or `builtin`) or its own dense cache. Their distributions are mixed per position in probability space, p = Σ_k w_k·p_k, as one teacher target. None = one teacher."""
    name: str = "teacher"
    """The first teacher's (teacher.path / teacher.cache) name, as records' `teacher_id` and metrics call it."""
    weight: float = 1.0
    """The first teacher's fixed weight; all fixed weights are normalised to sum to 1."""
    mix: str = "fixed"
    """How the teachers' weights are set per example: fixed (the configured weights), confidence (× exp of each teacher's mean log-prob of the example's labelled tokens at loss.temperature), correctness (× 0 for a teacher whose greedy answer to a checkable example is wrong; live teachers), ddk (× per-domain factors from the student/teacher held-out CE ratio, updated at each evaluation; live teachers) or route (all weight on the teacher named by the record's `teacher_id`)."""
    ddk_smoothing: float = 0.5
    """teachers.mix=ddk: α of DDK's factor smoothing, r ← α·softmax_k(log r + CE_student/CE_k) + (1 − α)/K per domain (0 < α ≤ 1)."""


MIX_MODES = ("fixed", "confidence", "correctness", "ddk", "route")
ENTRY_KEYS = ("name", "path", "cache", "weight")
LIVE_ONLY = ("correctness", "ddk")  # both need a teacher that can run: answer a prompt, score held-out text


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of a multi-teacher run: index 0 is teacher.path / teacher.cache, the others teachers.extra."""
    name: str
    path: str | None
    cache: str | None
    weight: float
    key: str  # the config key that defines it, for messages: 'teacher.path', 'teachers.extra[1]'


def teacher_specs(cfg) -> list[TeacherSpec]:
    """Every teacher of the run in mixture order (checked: call after ``check_settings``)."""
    t = cfg.teachers
    first = TeacherSpec(t.name, None if cfg.teacher.cache else cfg.teacher.path, cfg.teacher.cache, float(t.weight),
                        "teacher.cache" if cfg.teacher.cache else "teacher.path")
    extra = [TeacherSpec(str(e["name"]), e.get("path"), e.get("cache"), float(e.get("weight", 1.0)),
                         f"teachers.extra[{i}]") for i, e in enumerate(t.extra or [])]
    return [first, *extra]


def _check_entry(i: int, entry) -> None:
    key = f"teachers.extra[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{key} must be a mapping {{name, path | cache, weight}}, got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {', '.join(map(str, unknown))}; use {', '.join(ENTRY_KEYS)}")
    if not isinstance(entry.get("name"), str) or not entry["name"].strip():
        raise ValueError(f"{key} needs a non-empty string 'name' (records' teacher_id refers to it)")
    if (entry.get("path") is None) == (entry.get("cache") is None):
        raise ValueError(f"{key} ('{entry['name']}'): set exactly one of 'path' (a live model) or 'cache' (its cache dir)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{key} ('{entry['name']}'): weight must be a finite number ≥ 0, got {weight!r}")


def check_settings(cfg) -> None:
    t = cfg.teachers
    if t.mix not in MIX_MODES:
        raise ValueError(f"teachers.mix={t.mix!r}: use {', '.join(MIX_MODES)}")
    if not 0 < t.ddk_smoothing <= 1:
        raise ValueError(f"teachers.ddk_smoothing must be in (0, 1], got {t.ddk_smoothing}")
    if not math.isfinite(t.weight) or t.weight < 0:
        raise ValueError(f"teachers.weight must be a finite number ≥ 0, got {t.weight}")
    if t.extra is None:
        if t.mix != "fixed":
            raise ValueError(f"teachers.mix={t.mix} mixes several teachers: list the others in teachers.extra")
        return
    if not isinstance(t.extra, list) or not t.extra:
        raise ValueError("teachers.extra must be a non-empty list of {name, path | cache, weight} (or null)")
    for i, entry in enumerate(t.extra):
        _check_entry(i, entry)
    _check_run(cfg)
    specs = teacher_specs(cfg)
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"teachers: name {dup[0]!r} is used twice (teachers.name and teachers.extra names must differ)")
    if t.mix != "route" and sum(s.weight for s in specs) <= 0:
        raise ValueError("teachers: every weight is 0 (teachers.weight and teachers.extra[*].weight); give one > 0")
    if t.mix in LIVE_ONLY:
        cached = [s for s in specs if s.cache]
        if cached:
            raise ValueError(f"teachers.mix={t.mix} runs every teacher (generation or held-out scoring) but "
                             f"'{cached[0].name}' ({cached[0].key}) is a cache: give it as a live path")


def _check_run(cfg) -> None:
    """What a multi-teacher run needs of the rest of the config."""
    t, obj = cfg.teacher, cfg.objective()
    if not (t.path or t.cache) or t.server_url or t.self_distill != "none":
        raise ValueError("teachers.extra adds teachers to teacher.path or teacher.cache: set one of them (not "
                         "teacher.server_url or teacher.self_distill)")
    if not obj.needs_teacher:
        raise ValueError(f"teachers.extra: loss.objective '{obj}' uses no teacher")
    if obj.temperature_schedule is not None:
        raise ValueError("teachers.extra: loss.temperature_schedule needs one teacher's distribution at T = 1 for its "
                         "label NLL; use a fixed loss.temperature with several teachers")
    if obj.selection is not None and cfg.loss.temperature != 1.0:
        raise ValueError("teachers.extra with loss.select: token statistics read the mixture at T = 1, so set "
                         "loss.temperature=1")
