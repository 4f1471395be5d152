"""Reports from a run directory: ``report.md`` with a summary table, settings, plots and a sample, and a
side-by-side comparison of several runs (markdown or a rich table, built from the same rows).

Run layout read here (written by ``train.py``): ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON
object per line, each with ``step`` and ``kind`` = train | eval), ``final/`` (the student).
"""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table
from rich.text import Text

from potstill.io import atomic_write_bytes, iter_jsonl
from potstill.speculative.acceptance import tokens_per_call

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
MISSING = "—"

# (label, student key, teacher key) of the summary table; a teacher column appears only when a teacher was used.
SUMMARY_ROWS = [
    ("cross-entropy (nats/token)", "student_ce", "teacher_ce"),
    ("perplexity", "student_ppl", "teacher_ppl"),
    ("bits per byte (held-out text)", "bpb", "teacher_bpb"),
    ("KL(teacher ‖ student)", "kl_teacher_student", None),
    ("golden KL(true ‖ model)", "golden_kl_student", "golden_kl_teacher"),
    ("top-1 agreement with teacher", "top1_agreement", None),
    ("draft acceptance α = Σ min(p, q) (T = 1)", "acceptance_alpha", None),
    ("ECE (15 bins)", "ece", None),
    ("tokens evaluated", "tokens", None),
    ("answer accuracy (greedy)", "task_accuracy", None),
    ("generation length (tokens)", "gen_length", None),
    ("EOS rate", "eos_rate", None),
]

# (metric key, lower is better) of the run comparison.
COMPARE_METRICS = [
    ("student_ce", True),
    ("student_ppl", True),
    ("kl_teacher_student", True),
    ("top1_agreement", False),
    ("ece", True),
]
# Shown only when some compared run logged them (built-in held-out data, checkable tasks).
OPTIONAL_COMPARE_METRICS = [
    ("bpb", True),
    ("acceptance_alpha", False),
    ("golden_kl_student", True),
    ("golden_kl_teacher", True),
    ("task_accuracy", False),
]


# ---- reading a run ---------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path | str) -> list[dict]:
    """Every record of ``RUN/metrics.jsonl`` in file order; errors name the file and the line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a potstill run: it has no {METRICS_FILE}")
    records = []
    for lineno, record in iter_jsonl(path):
        if not isinstance(record, dict) or "step" not in record or "kind" not in record:
            raise ValueError(f"{path}:{lineno}: expected an object with 'step' and 'kind'")
        records.append(record)
    return records


def read_config(run_dir: Path | str) -> dict:
    """The resolved config as a nested dict; {} when the run has none (the report then shows placeholders)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    config = yaml.safe_load(path.read_text())
    return config if isinstance(config, dict) else {}


def records_of_kind(records: Iterable[dict], kind: str) -> list[dict]:
    """Records of one kind ordered by step; if a step was logged twice (a resumed run), the later line wins."""
    by_step = {r["step"]: r for r in records if r.get("kind") == kind}
    return [by_step[s] for s in sorted(by_step)]


def _setting(config: dict, section: str, key: str) -> Any:
    value = config.get(section)
    return value.get(key) if isinstance(value, dict) else None


def _setting_text(config: dict, section: str, key: str) -> str:
    """A setting as written in the config (not the 4-decimal metric format); a dash when absent."""
    value = _setting(config, section, key)
    return MISSING if value is None else str(value)


# ---- formatting ------------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, int):  # bools and counts
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def _cell(text: str) -> str:
    """Markdown table cell: a literal '|' would end the cell."""
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    """Inline code, so objectives like '0.5*ce + fkl' are not read as emphasis."""
    return f"`{text}`" if text != MISSING else text


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fenced(text: str) -> str:
    """A code block whose fence is longer than any run of backticks inside ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _student_source(config: dict) -> str:
    student = config.get("student") if isinstance(config.get("student"), dict) else {}
    if student.get("path"):
        return str(student["path"])
    if student.get("init_from_teacher_layers"):
        return f"teacher's first {student['init_from_teacher_layers']} layers"
    model_config = student.get("config")
    if isinstance(model_config, dict):
        return f"fresh {model_config.get('model_type', 'model')} from config"
    return str(model_config) if model_config else MISSING


# ---- report.md -------------------------------------------------------------------------------------------------


def _summary_section(last_eval: dict | None) -> str:
    if last_eval is None:
        return "## Final evaluation\n\nNo evaluation was logged."
    with_teacher = any(t and t in last_eval for _, _, t in SUMMARY_ROWS)
    headers = ["metric", "student"] + (["teacher"] if with_teacher else [])
    rows = []
    for label, student_key, teacher_key in SUMMARY_ROWS:
        if student_key not in last_eval:
            continue
        row = [label, fmt(last_eval[student_key])]
        if with_teacher:
            row.append(fmt(last_eval.get(teacher_key)) if teacher_key else "")
        rows.append(row)
    return f"## Final evaluation (step {last_eval['step']})\n\n" + markdown_table(headers, rows) + _draft_line(last_eval)


REPORT_GAMMA = 4  # draft tokens per round the report's τ is quoted at


def _draft_line(last_eval: dict) -> str:
    """The student as a speculative-decoding draft for the teacher: τ from α (docs/drafts.md)."""
    alpha = last_eval.get("acceptance_alpha")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        return ""
    tau = tokens_per_call(float(alpha), REPORT_GAMMA)
    return (f"\n\nAs a speculative-decoding draft for the teacher (sampling at T = 1): α = {alpha:.4f} per token, so "
            f"τ = {tau:.2f} expected tokens per target call at γ = {REPORT_GAMMA} (the target's bonus/correction "
            "token counted).")


def _settings_section(config: dict, train: list[dict]) -> str:
    rows = [
        ["objective", _code(_setting_text(config, "loss", "objective"))],
        ["temperature", _setting_text(config, "loss", "temperature")],
        ["max steps", _setting_text(config, "train", "max_steps")],
        ["batch size", _setting_text(config, "train", "batch_size")],
        ["teacher", _setting_text(config, "teacher", "path")],
        ["student", _student_source(config)],
    ]
    text = "## Settings\n\n" + markdown_table(["setting", "value"], rows)
    if train:
        last = train[-1]
        speed = last.get("tokens_per_s")
        speed_text = f", {speed:,.0f} tokens/s" if isinstance(speed, (int, float)) else ""
        text += f"\n\nLast logged train step {last['step']}: loss {fmt(last.get('loss'))}{speed_text}."
    return text


def _markdown(run_dir: Path, config: dict, train: list[dict], evals: list[dict], plots: dict[str, Path]) -> str:
    last_eval = evals[-1] if evals else None
    parts = [f"# potstill run: {run_dir.resolve().name}", _summary_section(last_eval), _settings_section(config, train)]
    if plots:
        links = [f"![{title}]({path.relative_to(run_dir).as_posix()})" for title, path in plots.items()]
        parts.append("## Plots\n\n" + "\n\n".join(links))
    sample = next((e["sample"] for e in reversed(evals) if e.get("sample") is not None), None)
    if sample is not None:
        parts.append("## Sample\n\n" + _fenced(str(sample)))
    return "\n\n".join(parts) + "\n"


def write_report(run_dir: Path | str) -> Path:
    """Write ``RUN/report.md`` and its plots under ``RUN/plots/``; returns the report's path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config = read_config(run_dir)
    train, evals = records_of_kind(records, "train"), records_of_kind(records, "eval")
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    plots: dict[str, Path] = {}
    if train or evals:
        plots["loss curves"] = write_png(plots_dir / "loss.png", _loss_figure(train, evals))
    if any("golden_kl_student" in e for e in evals):
        plots["golden vs proxy"] = write_png(plots_dir / "golden.png", _golden_figure(evals, records))
    if any("task_accuracy" in e for e in evals):
        plots["answer accuracy"] = write_png(plots_dir / "task.png", _task_figure(evals))
    if any("acceptance_alpha" in e for e in evals):
        plots["draft acceptance"] = write_png(plots_dir / "acceptance.png", _acceptance_figure(evals))
    calibrated = [e for e in evals if e.get("calibration")]
    if calibrated:
        plots["reliability diagram"] = write_png(plots_dir / "calibration.png", _reliability_figure(calibrated[-1]))
    # The markdown goes last, so it never links to an image that is not there yet.
    return atomic_write_bytes(run_dir / "report.md", _markdown(run_dir, config, train, evals, plots).encode())


# ---- plots (Agg canvas on a bare Figure: the caller's pyplot backend and figures are untouched) ----------------


def new_figure(width: float, height: float) -> Figure:
    """A bare Figure on its own Agg canvas (no pyplot state), laid out to fit its labels."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_over_steps(ax, evals: list[dict], key: str, label: str, **style) -> None:
    """One evaluation metric against the step, at the evaluations that logged it (nothing when none did)."""
    points = [(e["step"], e[key]) for e in evals if key in e]
    if points:
        ax.plot(*zip(*points), marker="o", label=label, **style)


def _loss_figure(train: list[dict], evals: list[dict]) -> Figure:
    with_eval = any("student_ce" in e or "kl_teacher_student" in e for e in evals)
    fig = new_figure(10 if with_eval else 6, 4)
    axes = fig.subplots(1, 2 if with_eval else 1, squeeze=False)[0]
    steps = [r["step"] for r in train if "loss" in r]
    axes[0].plot(steps, [r["loss"] for r in train if "loss" in r], label="train loss")
    axes[0].set(xlabel="step", ylabel="loss", title="training objective")
    if with_eval:
        for key, label in (("student_ce", "held-out CE (student)"), ("kl_teacher_student", "KL(teacher ‖ student)")):
            _plot_over_steps(axes[1], evals, key, label)
        teacher_ce = [e["teacher_ce"] for e in evals if "teacher_ce" in e]
        if teacher_ce:  # the floor the student's CE is heading towards
            axes[1].axhline(teacher_ce[-1], linestyle="--", color="gray", label="teacher CE")
        axes[1].set(xlabel="step", ylabel="nats / token", title="evaluation")
        axes[1].legend()
    return fig


def _golden_figure(evals: list[dict], records: list[dict]) -> Figure:
    """Golden KL(true‖student) beside the proxy KL(teacher‖student) over steps; the teacher's own golden distance
    as the floor the proxy cannot see below; the step an early stop kept as best."""
    ax = (fig := new_figure(6, 4)).subplots()
    for key, label in (("golden_kl_student", "golden KL(true ‖ student)"), ("kl_teacher_student", "proxy KL(teacher ‖ student)"),
                       ("golden_kl_teacher", "golden KL(true ‖ teacher)")):
        _plot_over_steps(ax, evals, key, label, linestyle="--" if key == "golden_kl_teacher" else "-")
    stops = [r for r in records if r.get("kind") == "early_stop"]
    if stops:
        ax.axvline(stops[-1]["best_step"], color="gray", linestyle=":", label=f"best golden (step {stops[-1]['best_step']})")
    ax.set(xlabel="step", ylabel="nats / token", title="golden vs proxy")
    ax.legend()
    return fig


def _task_figure(evals: list[dict]) -> Figure:
    ax = (fig := new_figure(6, 4)).subplots()
    keys = sorted({k for e in evals for k in e if k.startswith("task_accuracy") or k.startswith("eos_rate")})
    for key in keys:
        _plot_over_steps(ax, evals, key, key)
    ax.set(xlabel="step", ylabel="fraction of held-out prompts", ylim=(-0.02, 1.02), title="greedy generations")
    ax.legend()
    return fig


def _acceptance_figure(evals: list[dict]) -> Figure:
    """The student as a draft over steps: α (speculative sampling at T = 1) and top-1 agreement (greedy)."""
    ax = (fig := new_figure(6, 4)).subplots()
    for key, label in (("acceptance_alpha", "α = Σ min(p, q) (sampling, T = 1)"), ("top1_agreement", "top-1 agreement (greedy)")):
        _plot_over_steps(ax, evals, key, label)
    ax.set(xlabel="step", ylabel="acceptance per draft token", ylim=(-0.02, 1.02), title="draft acceptance")
    ax.legend()
    return fig


def _reliability_figure(last_eval: dict) -> Figure:
    bins = last_eval["calibration"]  # [[mean_confidence, accuracy, count], ...] over equal-width bins of (0, 1]
    width = 1.0 / len(bins)
    centers = [(i + 0.5) * width for i in range(len(bins))]
    ax = (fig := new_figure(5, 5)).subplots()
    filled = [(c, b[1]) for c, b in zip(centers, bins) if b[2] > 0]
    if filled:
        ax.bar(*zip(*filled), width=width, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ece = last_eval.get("ece")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max student probability)", ylabel="accuracy")
    ax.set_title(f"reliability at step {last_eval['step']}: ECE = {fmt(ece)}")
    ax.legend(loc="upper left")
    return fig


def write_png(path: Path, fig: Figure) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())


# ---- comparing runs --------------------------------------------------------------------------------------------


def comparison_rows(run_dirs: Iterable[Path | str]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Headers, formatted cells and which cells are the best of their column: the one source both renderers use."""
    runs = []
    for run_dir in map(Path, run_dirs):
        records = read_metrics(run_dir)
        evals = records_of_kind(records, "eval")
        runs.append((run_dir, records, evals[-1] if evals else {}))
    metrics = COMPARE_METRICS + [m for m in OPTIONAL_COMPARE_METRICS if any(m[0] in last for _, _, last in runs)]
    raw = []
    for run_dir, records, last_eval in runs:
        steps = max((r["step"] for r in records), default=None)
        objective = _setting_text(read_config(run_dir), "loss", "objective")
        raw.append([run_dir.resolve().name, objective, steps] + [last_eval.get(key) for key, _ in metrics])
    headers = ["run", "objective", "steps"] + [key for key, _ in metrics]
    best = [[False] * len(headers) for _ in raw]
    for offset, (_, lower_is_better) in enumerate(metrics):
        col = 3 + offset
        values = [r[col] for r in raw if isinstance(r[col], (int, float)) and not math.isnan(r[col])]
        if values:
            target = min(values) if lower_is_better else max(values)
            for i, r in enumerate(raw):
                best[i][col] = r[col] == target
    cells = [[fmt(v) for v in r] for r in raw]
    return headers, cells, best


def compare_runs(run_dirs: Iterable[Path | str]) -> str:
    """A markdown table, one row per run, the best value of each metric column in bold."""
    headers, cells, best = comparison_rows(run_dirs)
    rows = []
    for row, row_best in zip(cells, best):
        row = [row[0], _code(row[1])] + row[2:]
        rows.append([f"**{c}**" if b else c for c, b in zip(row, row_best)])
    return markdown_table(headers, rows)


def compare_table_rich(run_dirs: Iterable[Path | str]) -> Table:
    """The same comparison for the terminal, transposed: one column per run, one row per setting or metric, so a
    dozen metrics still fit an 80-column terminal (cells as Text: run names are never markup)."""
    headers, cells, best = comparison_rows(run_dirs)
    table = Table(title="potstill runs (best in bold)")
    table.add_column("")
    for row in cells:
        table.add_column(Text(row[0]), justify="right")
    for i, header in enumerate(headers[1:], start=1):
        table.add_row(header, *(Text(row[i], style="bold" if row_best[i] else "") for row, row_best in zip(cells, best)))
    return table
