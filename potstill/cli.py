"""The `potstill` command: one verb = one typed function over the Python API.

Every verb runs under one error path (``verb`` below): a user mistake ends with one line ``error: ...`` and exit
code 2, any other exception with one line naming its type and exit code 1; ``potstill --debug VERB`` also prints
the traceback.
"""
from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import click
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from potstill import runtime
from potstill.config import RunConfig, describe_fields
from potstill.registry import UnknownName

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="potstill: distil large language models into small ones.")
console = Console()
err_console = Console(stderr=True)

_OPTIONS_HELP = "\n\n".join(f"[bold]{key}[/bold] (default {default}): {doc}" for key, default, doc in describe_fields())

# What a user can cause: bad config or data (ValueError, incl. CacheError, TokenizerMismatch), missing files or
# models (OSError), unknown registry names (UnknownName), unsupported models (NotImplementedError), run-dir
# refusals and device failures (RuntimeError), YAML syntax.
USER_ERRORS = (ValueError, OSError, UnknownName, NotImplementedError, RuntimeError, yaml.YAMLError)


class _ConsoleLogHandler(logging.Handler):
    """potstill's INFO lines (data counts, guardrail notes) on the console, which follows redirected streams."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


def _show_potstill_logs() -> None:
    log = logging.getLogger("potstill")
    if not any(isinstance(h, _ConsoleLogHandler) for h in log.handlers):
        log.addHandler(_ConsoleLogHandler())
    # Under torchrun every rank runs this CLI; one copy of the INFO lines (data counts, guardrail notes) is enough.
    log.setLevel(logging.INFO if runtime.launched_rank() == 0 else logging.WARNING)


_debug = {"on": False}  # set by the app callback on every invocation (--debug / POTSTILL_DEBUG)


@app.callback()
def _setup(debug: bool = typer.Option(False, "--debug", envvar="POTSTILL_DEBUG",
                                      help="On an error, print the full traceback too.")) -> None:
    """Keep the terminal for potstill's own progress bar: no per-file load/save bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _show_potstill_logs()
    _debug["on"] = debug


def _one_line(exc: BaseException) -> str:
    text = str(exc) if not isinstance(exc, KeyError) or isinstance(exc, UnknownName) else f"missing key {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _fail(exc: BaseException) -> None:
    """Print the error as one line (after the traceback with --debug) and exit: 2 for user errors, 1 otherwise."""
    if _debug["on"]:
        err_console.print(escape("".join(traceback.format_exception(exc))), highlight=False, soft_wrap=True)
    if isinstance(exc, USER_ERRORS):
        message, code = _one_line(exc), 2
    else:
        message, code = f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)", 1
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _with_error_path(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place where every verb's errors become one line
            _fail(exc)
        finally:
            runtime.shutdown()  # under torchrun: this rank leaves its process group before the interpreter exits

    return run


def verb(*args, **kwargs) -> Callable[[Callable], Callable]:
    """``app.command`` with the shared error path."""
    return lambda fn: app.command(*args, **kwargs)(_with_error_path(fn))


def _shortcuts(**flags: object) -> list[str]:
    """Command-line flags that are shorthands for config keys become overrides (applied before explicit ones)."""
    keys = {"teacher": "teacher.path", "cache": "teacher.cache", "student": "student.path", "student_config": "student.config",
            "init_layers": "student.init_from_teacher_layers", "data": "data.train", "validation": "data.validation",
            "objective": "loss.objective", "steps": "train.max_steps", "out": "out_dir"}
    return [f"{keys[k]}={v}" for k, v in flags.items() if v is not None]


@verb(epilog="Config keys (set in the YAML file or as section.key=value):\n\n" + _OPTIONS_HELP)
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
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint (its own config.yaml unless --config is given)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
) -> None:
    """Distil a teacher into a student (live teacher, teacher-forced on the data)."""
    from potstill.rundir import resume_config
    from potstill.train import distill as run

    flags = _shortcuts(teacher=teacher, cache=cache, student=student, student_config=student_config, init_layers=init_layers,
                       data=data, validation=validation, objective=objective, steps=steps, out=out)
    given = flags + list(overrides or [])
    # --resume without --config: the run's own config.yaml, with any given options on top
    cfg = resume_config(given) if resume and config is None else RunConfig.from_yaml(config, given)
    result = run(cfg, resume=resume, overwrite=overwrite)
    if runtime.launched_rank() == 0:
        _print_metrics(result.metrics, f"{result.run_dir}: final student in {result.final_dir}")


@verb("cache", epilog="Config keys (set in the YAML file or as section.key=value):\n\n" + _OPTIONS_HELP)
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
    cfg = RunConfig.from_yaml(config, flags + list(overrides or []), check_run=False)
    summary = build_from_config(cfg)
    _print_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, f"cache {summary['dir']} ({summary['mode']})")


@verb("eval")
def eval_cmd(
    run_or_model: Path = typer.Argument(..., help="A run directory (evaluates its final/ student) or a model directory."),
    teacher: Optional[str] = typer.Option(None, help="Teacher for reference metrics (default: the run's teacher)."),
    data: Optional[str] = typer.Option(None, help="Held-out data (default: the run's validation data)."),
) -> None:
    """Evaluate a student: held-out CE/perplexity, KL to the teacher, top-1 agreement, ECE, a sample."""
    from potstill.evaluate_run import evaluate_path

    metrics = evaluate_path(run_or_model, teacher=teacher, data=data)
    _print_metrics(metrics, str(run_or_model))


@verb()
def report(run_dirs: list[Path] = typer.Argument(..., help="One or more run directories to compare.")) -> None:
    """Write report.md for each run and print them side by side."""
    from potstill.report import compare_table_rich, write_report

    for run_dir in run_dirs:
        console.print(f"wrote {write_report(run_dir)}")
    console.print(compare_table_rich(run_dirs))


@verb()
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


@verb()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Where the two runs and the comparison go."),
    steps: Optional[int] = typer.Option(None, help="Override the number of steps per student."),
) -> None:
    """Offline demo on the built-in default: a CE-only and a KD student at equal budget, compared."""
    from potstill.quickstart import run_quickstart

    run_quickstart(out, steps=steps, console=console)


@verb(epilog="Config keys (set in the YAML file or as section.key=value; generate.* are this verb's):\n\n" + _OPTIONS_HELP)
def generate(
    overrides: list[str] = typer.Argument(None, help="section.key=value overrides, e.g. generate.n=4"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (its teacher, data and generate sections)."),
    teacher: Optional[str] = typer.Option(None, help="Local teacher (backends local, vllm): HF dir, hub id, or 'builtin'."),
    data: Optional[str] = typer.Option(None, help="Prompts: prompt/completion or chat records (.jsonl, .parquet, datasets dir) or 'builtin:arithmetic'."),
    out: Optional[str] = typer.Option(None, help="Output JSONL (generate.out); rerun to resume it."),
    backend: Optional[str] = typer.Option(None, help="local, openai or vllm (generate.backend)."),
    model: Optional[str] = typer.Option(None, help="openai: the model name to request (generate.model)."),
    base_url: Optional[str] = typer.Option(None, help="openai: the server's base URL, e.g. http://127.0.0.1:8000/v1 (generate.base_url)."),
    n: Optional[int] = typer.Option(None, help="Completions per prompt (generate.n)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output instead of resuming it."),
) -> None:
    """Write teacher completions for the prompts of data.train as training records (resumable JSONL)."""
    from potstill.generation import generate as run

    given = {"generate.out": out, "generate.backend": backend, "generate.model": model, "generate.base_url": base_url,
             "generate.n": n}
    flags = _shortcuts(teacher=teacher, data=data) + [f"{k}={v}" for k, v in given.items() if v is not None]
    cfg = RunConfig.from_yaml(config, flags + list(overrides or []), check_run=False)
    summary = run(cfg, overwrite=overwrite)
    _print_metrics(summary.metrics(), f"generate → {summary.out}")
    if summary.failed:
        shown = ", ".join(f"{p}/{s}" for p, s in summary.failed[:10]) + (" ..." if len(summary.failed) > 10 else "")
        raise RuntimeError(f"{len(summary.failed)} request(s) failed after the retries (prompt_id/sample: {shown}); "
                           "rerun the same command to retry them")


@verb()
def serve(
    model: str = typer.Argument(..., help="Model to serve: a local HF directory (e.g. a run's final/), a hub id, or 'builtin'."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (the default is reachable from this machine only)."),
    port: int = typer.Option(8000, help="Port (0 = any free port; the bound address is printed)."),
    model_name: Optional[str] = typer.Option(None, help="The name clients send as `model` (default: the directory's name; a run's final/ → the run's)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on a GPU with native bf16, else float32), float32, bfloat16 or float16."),
    max_logprobs: int = typer.Option(20, help="Largest logprobs / top_logprobs a request may ask for."),
) -> None:
    """Serve a local causal LM behind the OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions (with prompt scoring)."""
    from potstill.serving.server import serve as run

    run(model, host=host, port=port, model_name=model_name, device=device, dtype=dtype, max_logprobs=max_logprobs,
        announce=lambda line: print(line, flush=True))


@verb()
def speculate(
    target: str = typer.Option(..., help="Target model: local HF dir, hub id, or 'builtin'."),
    draft: str = typer.Option(..., help="Draft model (same tokenizer): local HF dir or hub id."),
    prompts: str = typer.Option(..., help="Prompts: prompt/completion or chat records (.jsonl, .parquet, datasets dir), 'builtin' or 'builtin:arithmetic'."),
    out: Path = typer.Option(Path("runs/speculate"), help="Where results.json, report.md and plots/ go."),
    gamma: str = typer.Option("1-8", help="Draft tokens per round: one (4), a range (1-8) or a list (1,2,4)."),
    adaptive: bool = typer.Option(False, help="Also decode with adaptive γ."),
    temperature: float = typer.Option(0.0, help="0 = greedy (outputs checked against target-only); > 0 = speculative sampling."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (temperature > 0)."),
    max_new_tokens: int = typer.Option(64, help="New tokens per prompt at most."),
    max_prompts: int = typer.Option(32, help="Prompts to decode (the first ones of --prompts)."),
    hf_assisted: bool = typer.Option(True, help="Also time HF assisted generation at each γ."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out data (file or 'builtin') for the α predicted from 1 − TVD."),
    seed: int = typer.Option(0, help="Sampling seed (prompt i uses seed + i)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on a GPU with native bf16, else float32), float32, bfloat16 or float16."),
    warmup: int = typer.Option(2, help="Untimed decodes of the first prompt per method."),
) -> None:
    """Measure speculative decoding of a target with a draft: acceptance, τ and wall-clock speed-up per γ."""
    from potstill.speculative.inputs import MeasureSettings, load_inputs, parse_gammas
    from potstill.speculative.measure import measure
    from potstill.speculative.report import results_table_rich, write_outputs

    settings = MeasureSettings(target=target, draft=draft, prompts=prompts, out=str(out), gammas=parse_gammas(gamma),
                               adaptive=adaptive, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               max_prompts=max_prompts, hf_assisted=hf_assisted, eval_data=eval_data, seed=seed,
                               device=device, dtype=dtype, warmup=warmup)
    results = measure(settings, load_inputs(settings))
    console.print(results_table_rich(results))
    console.print(f"wrote {write_outputs(results, out)}")


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
