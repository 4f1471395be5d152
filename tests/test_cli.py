"""The CLI is a thin layer over the Python API: drive it as a user would."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from potstill.cli import app
from tests.conftest import save_tiny_model

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
    assert "data: 294 training examples from" in result.output  # encode counts are shown, not silent
    again = runner.invoke(app, args)  # same out dir without --resume/--overwrite
    assert again.exit_code == 2 and "already holds a run" in again.output
    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last, trained = rows[-1], [r for r in rows if r["kind"] == "eval" and "source" not in r]
    assert last["source"] == "potstill eval" and last["step"] == 4 and "kl_teacher_student" in last
    assert [r["step"] for r in trained] == [2, 4] and all("acceptance_alpha" in r for r in trained)  # every evaluation
    assert last["acceptance_alpha"] == pytest.approx(trained[-1]["acceptance_alpha"], rel=1e-5)  # final/ = step 4's model
    reported = runner.invoke(app, ["report", str(out), str(out)], terminal_width=200)
    assert reported.exit_code == 0, reported.output
    assert "report.md" in reported.output


def test_cli_errors_are_clear(tmp_path, model_dirs):
    bad = runner.invoke(app, ["distill", "--teacher", str(model_dirs["llama_teacher"]), "--init-layers", "1",
                              "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "missing.jsonl does not exist" in bad.output
    typo = runner.invoke(app, ["distill", "--teacher", "x", "--init-layers", "1", "train.max_step=3"])
    assert typo.exit_code == 2 and 'Did you mean "max_steps"' in typo.output


def error_line(result) -> str:
    """The run ended with exactly one error line, after any progress/info output, and printed no traceback."""
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output, result.output
    assert sum(line.startswith("error:") for line in lines) == 1, result.output
    assert lines[-1].startswith("error:"), result.output
    return lines[-1]


BASE = ["distill", "--teacher", "x", "--init-layers", "1"]  # fails at config load, before any model is touched


@pytest.mark.parametrize("args, expected", [
    (BASE + ["--objective", "fkll"], 'unknown divergence \'fkll\'. Did you mean "fkl"?'),
    (BASE + ["loss.select=entropi"], 'unknown token selector \'entropi\'. Did you mean "entropy"?'),
    (BASE + ["loss.temperature_schedule=dtz"], 'Did you mean "dts"?'),
    (BASE + ["train.max_step=3"], 'unknown config key \'train.max_step\'. Did you mean "max_steps"?'),
    (BASE + ["train.max_steps"], "override 'train.max_steps': write it as section.key=value"),
    (BASE + ["train.lr=[1,"], "override 'train.lr=[1,': invalid YAML"),
    (BASE + ["train.max_steps=1e-3"], "'train.max_steps' expects int (a whole number), got '1e-3'"),
], ids=["objective", "selector", "schedule", "key", "override-syntax", "override-yaml", "number"])
def test_config_mistakes_end_in_one_line(args, expected):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [error_line(result)]
    assert expected in error_line(result)


def test_file_and_model_mistakes_end_in_one_line(tmp_path, model_dirs, tokenizer, text_jsonl):
    out = ["--out", str(tmp_path / "run")]
    student = ["--student", str(model_dirs["gpt2_student"])]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: [1,\n")
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"text": "the cat"}\n{"text": "caf\xe9"}\n')
    qwen_with_tokenizer = save_tiny_model(tmp_path / "q", "qwen2", tokenizer, with_tokenizer=True)
    cases = [
        (["distill", "--config", str(bad_yaml)], "bad.yaml:3: invalid YAML"),
        (["distill", "--teacher", str(tmp_path / "nope"), *student, *out], "model directory has no config.json"),
        (["distill", "--teacher", "no/such/model", *student, *out],
         "teacher.path 'no/such/model': not a local directory and not found on the Hugging Face hub (offline?)"),
        (["distill", "--teacher", str(model_dirs["llama_teacher"]), *student, "--data", str(tmp_path / "missing.jsonl"), *out],
         "missing.jsonl does not exist"),
        (["distill", "--teacher", str(model_dirs["llama_teacher"]), *student, "--data", str(bad_utf8), *out],
         "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)"),
        (["distill", "--teacher", str(model_dirs["llama_teacher"]), "--student", str(qwen_with_tokenizer),
          "--data", str(text_jsonl), *out], "differently (teacher ["),
        (["distill", "--cache", str(tmp_path), *student, *out], "is it a cache written by `potstill cache`?"),
        (["eval", str(tmp_path / "no_run")], "no_run"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in error_line(result), (args, result.output)


def test_debug_shows_the_traceback():
    result = runner.invoke(app, ["--debug", *BASE, "--objective", "fkll"])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.output and "UnknownName" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: unknown divergence 'fkll'")
