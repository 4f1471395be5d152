"""The `potstill` command: one verb = one typed function over the Python API."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from potstill.config import RunConfig, describe_fields

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="potstill: distil large language models into small ones.")
console = Console()

_OPTIONS_HELP = "\n\n".join(f"[bold]{key}[/bold] (default {default}): {doc}" for key, default, doc in describe_fields())


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for potstill's own progress bar: no per-file load/save bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(2)


def _shortcuts(**flags: object) -> list[str]:
    """Command-line flags that are shorthands for config keys become overrides (applied before explicit ones)."""
    keys = {"teacher": "teacher.path", "cache": "teacher.cache", "student": "student.path", "student_config": "student.config",
            "init_layers": "student.init_from_teacher_layers", "data": "data.train", "validation": "data.validation",
            "objective": "loss.objective", "steps": "train.max_steps", "out": "out_dir"}
    return [f"{keys[k]}={v}" for k, v in flags.items() if v is not None]


@app.command(epilog="Config keys (set in the YAML file or as section.key=value):\n\n" + _OPTIONS_HELP)
def distill(
    overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. train.max_steps=50"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (see configs/)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher: local HF dir, hub id, or 'builtin'."),
    cache: Optional[str] = typer.Option(None, help="Read teacher signals from this cache (the teacher is loaded only to copy layers for --init-layers)."),
    student: Optional[str] = typer.Option(None, help="Student to start from: local HF dir or hub id."),
    student_config: Optional[str] = typer.Option(None, help="Fresh student from a config.json path."),
    init_layers: Optional[int] = typer.Option(None, help="Student = teacher's first N layers."),
    data: Optional[str] = typer.Option(None, help="Training data: .jsonl, .parquet, datasets dir, or 'builtin'."),
    validation: Optional[str] = typer.Option(None, help="Held-out data (same formats)."),
    objective: Optional[str] = typer.Option(None, help="e.g. 'fkl' or '0.5*ce + 0.5*gjsd(beta=0.5)'."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (train.max_steps)."),
    out: Optional[str] = typer.Option(None, help="Run directory (out_dir)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
) -> None:
    """Distil a teacher into a student (live teacher, teacher-forced on the data)."""
    from potstill.train import distill as run

    flags = _shortcuts(teacher=teacher, cache=cache, student=student, student_config=student_config, init_layers=init_layers,
                       data=data, validation=validation, objective=objective, steps=steps, out=out)
    try:
        cfg = RunConfig.from_yaml(config, flags + list(overrides or []))
        result = run(cfg, resume=resume, overwrite=overwrite)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    _print_metrics(result.metrics, f"{result.run_dir}: final student in {result.final_dir}")


@app.command("cache", epilog="Config keys (set in the YAML file or as section.key=value):\n\n" + _OPTIONS_HELP)
def cache_cmd(
    overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. cache.k=32"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (its teacher, data, loss.temperature)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher to run: local HF dir, hub id, or 'builtin'."),
    data: Optional[str] = typer.Option(None, help="Training data: .jsonl, .parquet, datasets dir, or 'builtin'."),
    out: Optional[str] = typer.Option(None, help="Cache directory (teacher.cache)."),
    mode: Optional[str] = typer.Option(None, help="dense, topk or sample (cache.mode)."),
) -> None:
    """Run the teacher once over the training data and store its signal (resumable; one shard set per rank)."""
    from potstill.cache.run import build_from_config

    flags = _shortcuts(teacher=teacher, data=data, cache=out) + ([f"cache.mode={mode}"] if mode else [])
    try:
        cfg = RunConfig.from_yaml(config, flags + list(overrides or []), check_run=False)
        summary = build_from_config(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    _print_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, f"cache {summary['dir']} ({summary['mode']})")


@app.command("eval")
def eval_cmd(
    run_or_model: Path = typer.Argument(..., help="A run directory (evaluates its final/ student) or a model directory."),
    teacher: Optional[str] = typer.Option(None, help="Teacher for reference metrics (default: the run's teacher)."),
    data: Optional[str] = typer.Option(None, help="Held-out data (default: the run's validation data)."),
) -> None:
    """Evaluate a student: held-out CE/perplexity, KL to the teacher, top-1 agreement, ECE, a sample."""
    from potstill.evaluate_run import evaluate_path

    try:
        metrics = evaluate_path(run_or_model, teacher=teacher, data=data)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    _print_metrics(metrics, str(run_or_model))


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="One or more run directories to compare.")) -> None:
    """Write report.md for each run and print them side by side."""
    from potstill.report import compare_table_rich, write_report

    try:
        for run_dir in run_dirs:
            console.print(f"wrote {write_report(run_dir)}")
        console.print(compare_table_rich(run_dirs))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)


@app.command()
def losses() -> None:
    """List the registered objectives, token selectors and temperature schedules with their hyperparameters."""
    from potstill import list_divergences
    from potstill.losses.hparams import describe
    from potstill.losses.objective import TEMPERATURE_SCHEDULES
    from potstill.losses.selection import SELECTORS

    def hp_text(hparams: dict) -> str:
        return ", ".join(f"{k}={v['default']:g} in [{v['range'][0]:g}, {v['range'][1]:g}]" for k, v in hparams.items()) or "-"

    table = Table(title="objectives (loss.objective, e.g. '0.5*ce + gjsd(beta=0.5)')")
    for col in ("name", "target", "hyperparameters", "description"):
        table.add_column(col)
    for d in list_divergences():
        table.add_row(d["name"], d["target"], hp_text(d["hparams"]), d["doc"])
    console.print(table)
    selectors = Table(title="token selectors (loss.select, e.g. 'entropy(keep=0.2)')")
    for col in ("name", "hyperparameters", "description"):
        selectors.add_column(col)
    for name in SELECTORS.names():
        spec = SELECTORS.get(name)
        selectors.add_row(name, hp_text(describe(spec.hparams)), spec.doc)
    console.print(selectors)
    schedules = ", ".join(f"{n}({hp_text(describe(declared))})" for n, (_, declared) in TEMPERATURE_SCHEDULES.items())
    console.print(f"temperature schedules (loss.temperature_schedule): fixed, {schedules}", soft_wrap=True)


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Where the two runs and the comparison go."),
    steps: Optional[int] = typer.Option(None, help="Override the number of steps per student."),
) -> None:
    """Offline demo on the built-in default: a CE-only and a KD student at equal budget, compared."""
    from potstill.quickstart import run_quickstart

    try:
        run_quickstart(out, steps=steps, console=console)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)


def _print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
