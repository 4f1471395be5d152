"""The CLI is a thin layer over the Python API: drive it as a user would."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from potstill.cli import app

runner = CliRunner()


def test_losses_lists_every_objective():
    result = runner.invoke(app, ["losses"])
    assert result.exit_code == 0, result.output
    for name in ("fkl", "rkl", "gjsd", "ce", "beta=0.5"):
        assert name in result.output


def test_distill_help_shows_config_docs():
    result = runner.invoke(app, ["distill", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "train.grad_accum" in result.output and "Micro-batches per optimiser step" in result.output


def test_distill_eval_report_round_trip(tmp_path, model_dirs, text_jsonl):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(model_dirs["llama_teacher"]), "--student", str(model_dirs["gpt2_student"]),
            "--data", str(text_jsonl), "--steps", "4", "--out", str(out), "--objective", "0.5*ce + 0.5*gjsd(beta=0.5)",
            "data.max_eval_examples=8", "eval.max_new_tokens=3", "train.eval_every=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "final" / "model.safetensors").exists()
    again = runner.invoke(app, args)  # same out dir without --resume/--overwrite
    assert again.exit_code == 2 and "already holds a run" in again.output
    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["source"] == "potstill eval" and last["step"] == 4 and "kl_teacher_student" in last
    reported = runner.invoke(app, ["report", str(out), str(out)], terminal_width=200)
    assert reported.exit_code == 0, reported.output
    assert "report.md" in reported.output


def test_cli_errors_are_clear(tmp_path, model_dirs):
    bad = runner.invoke(app, ["distill", "--teacher", str(model_dirs["llama_teacher"]), "--init-layers", "1",
                              "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "missing.jsonl does not exist" in bad.output
    typo = runner.invoke(app, ["distill", "--teacher", "x", "--init-layers", "1", "train.max_step=3"])
    assert typo.exit_code == 2 and 'Did you mean "max_steps"' in typo.output
