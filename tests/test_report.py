from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from potstill.report import compare_runs, compare_table_rich, read_metrics, write_report

CONFIG = {
    "teacher": {"path": "tiny-teacher", "dtype": "float32"},
    "student": {"path": None, "config": {"model_type": "llama", "hidden_size": 32}, "init_from_teacher_layers": None},
    "data": {"train": "builtin"},
    "loss": {"objective": "0.5*ce + 0.5*gjsd(beta=0.5)", "temperature": 2.0},
    "train": {"max_steps": 20, "batch_size": 8},
    "eval": {"batch_size": 16},
    "out_dir": "runs/x",
}


def eval_line(step: int, student_ce: float, kl: float, top1: float, ece: float, sample: str = "the cat sat") -> dict:
    calibration = [[(i + 0.5) / 15, 0.0, 0] for i in range(15)]
    calibration[3], calibration[10] = [0.25, 0.2, 40], [0.7, 0.75, 60]
    return {
        "step": step, "kind": "eval", "student_ce": student_ce, "student_ppl": 2.0 * student_ce, "teacher_ce": 1.25,
        "teacher_ppl": 3.4903, "kl_teacher_student": kl, "top1_agreement": top1, "ece": ece, "tokens": 100,
        "calibration": calibration, "sample": sample,
    }


def make_run(root: Path, name: str, *, student_ce: float, kl: float, top1: float, ece: float, objective: str = "fkl") -> Path:
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "loss": {"objective": objective, "temperature": 2.0}}))
    lines = [
        {"step": 10, "kind": "train", "loss": 3.5, "lr": 1e-3, "tokens_per_s": 1000.0, "grad_norm": 0.5, "term/ce": 3.0},
        eval_line(10, student_ce + 1.0, kl + 1.0, top1 / 2, ece, sample="an older sample"),
        {"step": 20, "kind": "train", "loss": 2.25, "lr": 5e-4, "tokens_per_s": 1200.0, "grad_norm": 0.4, "term/ce": 2.0},
        eval_line(20, student_ce, kl, top1, ece, sample="the ``` cat sat"),
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_write_report_writes_markdown_and_plots(tmp_path):
    run = make_run(tmp_path, "run-a", student_ce=2.5, kl=0.125, top1=0.625, ece=0.0375, objective="0.5*ce + 0.5*gjsd(beta=0.5)")
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    assert text.startswith("# potstill run: run-a")
    assert "| cross-entropy (nats/token) | 2.5000 | 1.2500 |" in text  # student vs teacher columns
    assert "| KL(teacher ‖ student) | 0.1250 |  |" in text
    assert "| top-1 agreement with teacher | 0.6250 |  |" in text
    assert "| ECE (15 bins) | 0.0375 |  |" in text
    assert "Final evaluation (step 20)" in text
    assert "| objective | `0.5*ce + 0.5*gjsd(beta=0.5)` |" in text
    assert "| temperature | 2.0 |" in text and "| max steps | 20 |" in text and "| batch size | 8 |" in text
    assert "| teacher | tiny-teacher |" in text and "| student | fresh llama from config |" in text
    assert "![loss curves](plots/loss.png)" in text and "![reliability diagram](plots/calibration.png)" in text
    assert "````text\nthe ``` cat sat\n````" in text  # the last sample, fenced longer than its own backticks
    assert "an older sample" not in text
    for png in ("loss.png", "calibration.png"):
        data = (run / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert not [p for p in run.rglob("*.tmp")]  # atomic writes leave no temporaries behind


def test_report_without_eval_or_config(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n")
    text = write_report(run).read_text()
    assert "No evaluation was logged." in text and "| objective | — |" in text
    assert (run / "plots" / "loss.png").stat().st_size > 0 and not (run / "plots" / "calibration.png").exists()


def test_read_metrics_names_the_malformed_line(tmp_path):
    run = make_run(tmp_path, "broken", student_ce=1.0, kl=0.1, top1=0.5, ece=0.1)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 30, "kind": "train", "loss": \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:5: malformed JSON"):
        read_metrics(run)


def test_read_metrics_requires_step_and_kind(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n\n{"loss": 1.0}\n')
    with pytest.raises(ValueError, match=":3: expected an object with 'step' and 'kind'"):
        read_metrics(tmp_path)


def test_missing_metrics_says_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a potstill run"):
        read_metrics(tmp_path)


def test_compare_runs_bolds_the_better_run(tmp_path):
    good = make_run(tmp_path, "good", student_ce=2.0, kl=0.1, top1=0.8, ece=0.05, objective="gjsd(beta=0.5)")
    bad = make_run(tmp_path, "bad", student_ce=3.0, kl=0.3, top1=0.6, ece=0.02, objective="fkl")
    table = compare_runs([good, bad])
    lines = table.splitlines()
    assert lines[0] == "| run | objective | steps | student_ce | student_ppl | kl_teacher_student | top1_agreement | ece |"
    assert lines[2] == "| good | `gjsd(beta=0.5)` | 20 | **2.0000** | **4.0000** | **0.1000** | **0.8000** | 0.0500 |"
    assert lines[3] == "| bad | `fkl` | 20 | 3.0000 | 6.0000 | 0.3000 | 0.6000 | **0.0200** |"


def test_compare_table_rich_has_the_same_rows(tmp_path):
    good = make_run(tmp_path, "good", student_ce=2.0, kl=0.1, top1=0.8, ece=0.05)
    bad = make_run(tmp_path, "bad", student_ce=3.0, kl=0.3, top1=0.6, ece=0.02)
    table = compare_table_rich([good, bad])  # transposed: a column per run, a row per setting or metric
    assert [str(c.header) for c in table.columns] == ["", "good", "bad"]
    names = [str(c) for c in table.columns[0]._cells]
    assert names == ["objective", "steps", "student_ce", "student_ppl", "kl_teacher_student", "top1_agreement", "ece"]
    ce_cells = [table.columns[run]._cells[2] for run in (1, 2)]
    assert [str(c) for c in ce_cells] == ["2.0000", "3.0000"] and ce_cells[0].style == "bold" and ce_cells[1].style == ""
    console = Console(file=io.StringIO(), width=80)
    console.print(table)
    printed = console.file.getvalue()
    assert "good" in printed and "0.0200" in printed


def test_report_shows_draft_acceptance_and_tau(tmp_path):
    """acceptance_alpha: a summary row, τ at γ = 4 from it, the acceptance plot and a comparison column."""
    runs = []
    for name, alpha in (("ce-draft", 0.5), ("kd-draft", 0.75)):
        run = make_run(tmp_path, name, student_ce=2.5, kl=0.125, top1=0.625, ece=0.0375)
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            if line["kind"] == "eval":
                line["acceptance_alpha"] = alpha - 0.25 if line["step"] == 10 else alpha
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        runs.append(run)
    text = write_report(runs[1]).read_text()
    assert "| draft acceptance α = Σ min(p, q) (T = 1) | 0.7500 |  |" in text
    # τ = 1 + α + α² + α³ + α⁴ at α = 0.75: 3.05078125
    assert "α = 0.7500 per token, so τ = 3.05 expected tokens per target call at γ = 4" in text
    assert "![draft acceptance](plots/acceptance.png)" in text
    assert (runs[1] / "plots" / "acceptance.png").read_bytes().startswith(b"\x89PNG")
    lines = compare_runs(runs).splitlines()
    assert lines[0].endswith("| acceptance_alpha |")
    assert lines[2].endswith("| 0.5000 |") and lines[3].endswith("| **0.7500** |")


def test_report_without_acceptance_has_no_draft_line(tmp_path):
    run = make_run(tmp_path, "old-run", student_ce=2.5, kl=0.125, top1=0.625, ece=0.0375)
    text = write_report(run).read_text()
    assert "draft acceptance" not in text and "τ =" not in text and not (run / "plots" / "acceptance.png").exists()
    assert "acceptance_alpha" not in compare_runs([run])
