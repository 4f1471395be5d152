"""`potstill speculate`'s outputs from the measurement (``measure.summarise``): ``OUT/results.json`` (every number),
``OUT/report.md`` (settings, the per-γ table, the held-out prediction, plots) and ``OUT/plots/speculate.png``, and
the same table for the terminal. Conventions of ``potstill/report.py``: 4-decimal cells, a dash for a missing value,
Agg canvas on a bare Figure, atomic writes, the markdown written last.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from rich.table import Table

from potstill.io import atomic_write_bytes
from potstill.report import MISSING, fmt, markdown_table, new_figure, write_png

RESULTS_FILE, REPORT_FILE, PLOT_FILE = "results.json", "report.md", "plots/speculate.png"

# (header, row key) of the per-γ table; HF and held-out columns appear only when measured.
COLUMNS = [
    ("γ", "gamma"),
    ("acceptance (acc/prop)", "acceptance_rate"),
    ("α measured (acc/verified)", "alpha_measured"),
    ("α analytic (Σ min(p,q))", "alpha_analytic"),
    ("τ (bonus counted)", "tau"),
    ("τ predicted", "tau_predicted"),
    ("tokens/s", "tokens_per_s"),
    ("speed-up", "speedup"),
    ("speed-up predicted", "speedup_predicted"),
]
HF_COLUMNS = [("HF tokens/s", "hf_tokens_per_s"), ("HF τ", "hf_tau"), ("vs HF", "speedup_vs_hf")]
HELD_OUT_COLUMNS = [("τ pred. (held-out α)", "tau_predicted_held_out"),
                    ("speed-up pred. (held-out α)", "speedup_predicted_held_out")]
GREEDY_COLUMNS = [("greedy mismatches", "greedy_mismatches")]
HF_GREEDY_COLUMNS = [("HF greedy mismatches", "hf_greedy_mismatches")]


def columns(results: dict) -> list[tuple[str, str]]:
    rows = results["rows"]
    present = lambda key: any(r.get(key) is not None for r in rows)  # noqa: E731
    chosen = list(COLUMNS)
    chosen += HF_COLUMNS if present("hf_tokens_per_s") else []
    chosen += HELD_OUT_COLUMNS if present("tau_predicted_held_out") else []
    chosen += GREEDY_COLUMNS if present("greedy_mismatches") else []
    chosen += HF_GREEDY_COLUMNS if present("hf_greedy_mismatches") else []
    return chosen


def _cell(row: dict, key: str) -> str:
    if key == "gamma":  # adaptive γ: the mean γ proposed per round
        return f"adaptive ({row['mean_gamma']:.2f})" if row["gamma"] is None else str(row["gamma"])
    value = row.get(key)
    if key == "tokens_per_s" or key == "hf_tokens_per_s":
        return MISSING if value is None else f"{value:,.1f}"
    return fmt(value)


def table_rows(results: dict, chosen: list[tuple[str, str]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the per-γ table: the one source of the markdown and the rich table."""
    chosen = columns(results) if chosen is None else chosen
    return [h for h, _ in chosen], [[_cell(row, key) for _, key in chosen] for row in results["rows"]]


# The terminal's table: the headline columns under short headers (report.md has them all).
TERMINAL_COLUMNS = [("γ", "gamma"), ("α", "alpha_measured"), ("τ", "tau"), ("τ pred", "tau_predicted"),
                    ("tok/s", "tokens_per_s"), ("speedup", "speedup"), ("pred", "speedup_predicted"),
                    ("vs HF", "speedup_vs_hf"), ("mism.", "greedy_mismatches")]


def results_table_rich(results: dict) -> Table:
    shown = [c for c in TERMINAL_COLUMNS if any(r.get(c[1]) is not None for r in results["rows"])]
    headers, rows = table_rows(results, shown)
    base = results["baselines"]
    table = Table(title=f"speculative decoding, {results['prompts']} prompts: target only "
                        f"{base['target']['tokens_per_s']:,.1f} tokens/s, c = {fmt(base['cost_ratio'])}")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


# ---- report.md -------------------------------------------------------------------------------------------------


def _settings_section(results: dict) -> str:
    s, m, env = results["settings"], results["models"], results["environment"]
    decoding = "greedy" if s["temperature"] == 0 else f"sampling, temperature {s['temperature']}, top-p {s['top_p']}"
    rows = [["target", f"`{m['target']}` ({m['target_parameters']:,} parameters)"],
            ["draft", f"`{m['draft']}` ({m['draft_parameters']:,} parameters)"],
            ["prompts", f"`{s['prompts']}` ({results['prompts']} prompts, batch 1)"],
            ["decoding", f"{decoding}, at most {s['max_new_tokens']} new tokens, seed {s['seed']}"],
            ["warm-up", f"{s['warmup']} decodes of the first prompt per method, untimed"],
            ["device", f"{env['device']} ({env['device_name']}), {env['torch_threads']} torch threads"],
            ["versions", f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}"]]
    return "## Settings\n\n" + markdown_table(["setting", "value"], rows)


def _baseline_section(results: dict) -> str:
    base = results["baselines"]
    rows = [[name, str(base[key]["tokens"]), f"{base[key]['seconds']:.3f}", f"{base[key]['tokens_per_s']:,.1f}"]
            for name, key in (("target only", "target"), ("draft only", "draft"))]
    return ("## Baselines (plain KV-cached decoding, `sampling.sample`)\n\n"
            + markdown_table(["model", "tokens", "seconds", "tokens/s"], rows)
            + f"\n\nMeasured cost ratio c = draft seconds per token ÷ target seconds per token = "
              f"{fmt(base['cost_ratio'])}; the predicted speed-up is τ / (γ·c + 1).")


def _held_out_section(results: dict) -> str:
    held = results.get("held_out")
    if not held:
        return ("## Held-out α\n\nNot computed (pass `--eval-data FILE` or `--eval-data builtin` to predict α from "
                "teacher-forced held-out data).")
    measured = results["alpha_measured_fixed_gamma"]
    greedy = results["settings"]["temperature"] == 0
    what = "argmax agreement, greedy" if greedy else "mean Σ min(p, q) = 1 − TVD at the decoding temperature and top-p"
    return (f"## Held-out α\n\nPredicted from `{held['data']}` ({held['tokens']} teacher-forced positions, {what}): "
            f"**α = {fmt(held['alpha'])}**, beside the measured α over all fixed-γ runs = {fmt(measured)}.")


def _main_table(results: dict) -> str:
    headers, rows = table_rows(results)
    notes = ["τ = committed tokens ÷ target verification calls; the bonus / correction token each call adds is "
             "counted, so τ = γ + 1 when every draft token is accepted (less near the end of a sequence). HF τ = new "
             "tokens ÷ the target's forwards (HF's first one also reads the prompt).",
             "Speed-up = tokens/s ÷ target-only tokens/s over the same prompts; vs HF = tokens/s ÷ HF assisted "
             "tokens/s at the same γ.",
             "Predicted columns use the measured α: τ = (1 − α^(γ+1)) / (1 − α), speed-up = τ / (γ·c + 1)."]
    if any(r["gamma"] is None for r in results["rows"]):
        notes.append("adaptive (m): the decoder picks γ each round; m is the mean γ it proposed.")
    if any(r.get("greedy_mismatches") is not None for r in results["rows"]):
        notes.append("Greedy mismatches: prompts whose output differs from target-only greedy decoding (0 = lossless).")
    return "## Speculative decoding per γ\n\n" + markdown_table(headers, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def markdown(results: dict, plot: Path | None) -> str:
    parts = ["# potstill speculate", _settings_section(results), _main_table(results), _baseline_section(results),
             _held_out_section(results)]
    if plot is not None:
        parts.append(f"## Plots\n\n![speed-up and τ vs γ]({PLOT_FILE})")
    parts.append("See docs/speculative.md for what each column means.")
    return "\n\n".join(parts) + "\n"


# ---- plot ------------------------------------------------------------------------------------------------------


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["gamma"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return ([g for g, _ in points], [v for _, v in points])


def figure(results: dict) -> Figure:
    """Speed-up and τ against γ: measured (potstill, HF assisted) beside the predictions from the measured α and,
    when computed, from the held-out α."""
    rows = [r for r in results["rows"] if r["gamma"] is not None]
    fig = new_figure(10, 4)
    speed_ax, tau_ax = fig.subplots(1, 2)
    lines = [("speedup", "tau", "potstill (measured)", "-", "o"),
             ("hf_tokens_per_s", "hf_tau", "HF assisted (measured)", "-", "s"),
             ("speedup_predicted", "tau_predicted", "predicted from measured α", "--", None),
             ("speedup_predicted_held_out", "tau_predicted_held_out", "predicted from held-out α", ":", None)]
    for speed_key, tau_key, label, style, marker in lines:
        if speed_key == "hf_tokens_per_s":  # HF's speed-up over the same target-only baseline
            target = results["baselines"]["target"]["tokens_per_s"]
            gammas, values = _series(rows, speed_key)
            values = [v / target for v in values]
        else:
            gammas, values = _series(rows, speed_key)
        if gammas:
            speed_ax.plot(gammas, values, linestyle=style, marker=marker, label=label)
        gammas, values = _series(rows, tau_key)
        if gammas:
            tau_ax.plot(gammas, values, linestyle=style, marker=marker, label=label)
    speed_ax.axhline(1.0, color="gray", linewidth=0.8, label="target only")
    speed_ax.set(xlabel="γ (draft tokens per round)", ylabel="speed-up over target-only", title="wall-clock speed-up")
    tau_ax.set(xlabel="γ (draft tokens per round)", ylabel="tokens per target call", title="τ (bonus token counted)")
    for ax in (speed_ax, tau_ax):
        ax.set_xticks([r["gamma"] for r in rows])
        ax.legend(fontsize="small")
    return fig


def _finite(value):
    """NaN / inf (a ratio with nothing to divide by) as null: strict JSON that every reader accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_outputs(results: dict, out_dir: Path | str) -> Path:
    """results.json, the plot, then report.md (so it never links to an image that is not there); returns the
    report's path. The directory is created here, after every input was checked and every prompt decoded."""
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(results), indent=2, allow_nan=False)
    atomic_write_bytes(out_dir / RESULTS_FILE, (text + "\n").encode())
    plot = write_png(out_dir / PLOT_FILE, figure(results)) if any(r["gamma"] is not None for r in results["rows"]) else None
    return atomic_write_bytes(out_dir / REPORT_FILE, markdown(results, plot).encode())
