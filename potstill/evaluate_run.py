"""`potstill eval`: evaluate a run's final student (appending to its metrics.jsonl) or any model directory."""
from __future__ import annotations

import json
from pathlib import Path

from potstill import runtime
from potstill.assemble import load_examples, load_parts, teacher_held_out
from potstill.config import RunConfig
from potstill.monitor import held_out
from potstill.train import append_metrics, run_eval


def _run_config(path: Path, teacher: str | None, data: str | None) -> tuple[RunConfig, Path | None]:
    """The config to evaluate with, and the run dir to append metrics to (None for a bare model dir)."""
    overrides = []
    if (path / "config.yaml").exists() and (path / "final").exists():
        run_dir, raw_path, model_dir = path, path / "config.yaml", path / "final"
    elif (path / "config.json").exists():
        run_dir, raw_path, model_dir = None, None, path
        if not data:
            raise ValueError(f"{path} is a model directory, not a run: pass --data with held-out data")
    else:
        raise FileNotFoundError(f"{path} is neither a potstill run directory (config.yaml + final/) nor a model directory")
    # final/ of a LoRA run holds the merged student: evaluate it as a plain model
    overrides += [f"student.path={model_dir}", "student.config=", "student.init_from_teacher_layers=", "student.lora.r=0",
                  "student.tokenizer=",  # final/ holds the student's own tokenizer
                  "eval.early_stop=none"]  # evaluating stops nothing
    if teacher:
        overrides.append(f"teacher.path={teacher}")
    if data:
        overrides.append(f"data.validation={data}")
    # A self-distilled run's teacher was a copy of the student: a copy of final/ would compare it with itself
    self_taught = raw_path is not None and RunConfig.from_yaml(raw_path, check_run=False).teacher.self_distill != "none"
    if self_taught:
        overrides.append("teacher.self_distill=none")
    if not teacher and (run_dir is None or self_taught):
        overrides.append("loss.objective=ce")  # nothing to compare against: student-only metrics
    return RunConfig.from_yaml(raw_path, overrides), run_dir


def evaluate_path(path: Path, teacher: str | None = None, data: str | None = None) -> dict:
    cfg, run_dir = _run_config(Path(path), teacher, data)
    rt = runtime.setup(cfg.device)
    parts = load_parts(cfg, rt.device)
    _, held_examples = load_examples(cfg, parts.tokenizer, train=False)
    held = held_out(cfg, parts.tokenizer, held_examples, parts.vocab, rt.device, *teacher_held_out(cfg, parts, held_examples))
    step = _last_step(run_dir) if run_dir else 0
    row = run_eval(parts, held, cfg, step)
    if run_dir is not None:
        append_metrics(run_dir, {**row, "source": "potstill eval"})
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def _last_step(run_dir: Path) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)
