"""`potstill speculate` end to end on tiny models saved to temp dirs, driven through the CLI as a user would."""
from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from potstill.cli import app
from potstill.models import truncated_copy
from potstill.speculative.inputs import parse_gammas
from tests.conftest import builtin_prompt_completion_jsonl, save_tiny_model
from tests.test_cli import error_line

runner = CliRunner()
FAST = ["--max-new-tokens", "12", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return builtin_prompt_completion_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", 3, 5, 8)


@pytest.fixture(scope="module")
def one_layer_draft(tmp_path_factory, model_dirs, tokenizer):
    """The target's first layer (embeddings, block 0, final norm, head): a draft that agrees with it only sometimes."""
    path = tmp_path_factory.mktemp("drafts") / "one_layer"
    truncated_copy(AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]), 1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def speculate(tmp_path, target, draft, prompts, *extra):
    out = tmp_path / "out"
    result = runner.invoke(app, ["speculate", "--target", str(target), "--draft", str(draft), "--prompts", str(prompts),
                                 "--out", str(out), *FAST, *extra], terminal_width=200)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), out, result.output


def rows_by_gamma(results):
    return {row["gamma"]: row for row in results["rows"]}


def test_the_target_as_its_own_draft_accepts_everything(tmp_path, model_dirs, prompts_file):
    """draft == target: α = 1, every round commits γ + 1 tokens until the length limit cuts the last one short (so
    a prompt of n tokens takes ceil(n / (γ + 1)) target calls, in potstill and in HF assisted generation alike),
    and greedy output equals target-only output."""
    target = model_dirs["llama_teacher"]
    results, out, output = speculate(tmp_path, target, target, prompts_file, "--gamma", "1,3", "--adaptive",
                                     "--eval-data", str(prompts_file))
    assert (out / "report.md").exists() and (out / "plots" / "speculate.png").stat().st_size > 0
    assert "speculative decoding, 3 prompts" in output  # the terminal table
    rows = rows_by_gamma(results)
    assert set(rows) == {1, 3, None}
    for row in rows.values():
        assert row["alpha_measured"] == 1.0 and row["greedy_mismatches"] == 0
        assert row["alpha_analytic"] == pytest.approx(1.0, rel=1e-6)
    assert results["held_out"]["alpha"] == 1.0 and results["held_out"]["tokens"] > 0
    for gamma in (1, 3):
        assert rows[gamma]["hf_greedy_mismatches"] == 0
        assert rows[gamma]["tau_predicted"] == gamma + 1
        for method in (f"potstill:{gamma}", f"hf:{gamma}"):
            per_prompt = results["per_prompt"][method]
            assert [p["target_calls"] for p in per_prompt] == [math.ceil(p["tokens"] / (gamma + 1)) for p in per_prompt]
        calls = sum(p["target_calls"] for p in results["per_prompt"][f"potstill:{gamma}"])
        assert rows[gamma]["tau"] == pytest.approx(rows[gamma]["tokens"] / calls, rel=1e-12)
        assert rows[gamma]["tokens"] == results["baselines"]["target"]["tokens"]
    report = (out / "report.md").read_text()
    assert "| 1 | 1.0000 |" in report and "| 3 |" in report and "| adaptive (" in report
    assert "bonus" in report and "plots/speculate.png" in report


def test_a_one_layer_draft_is_lossless_and_its_numbers_add_up(tmp_path, model_dirs, one_layer_draft, prompts_file):
    """A draft that is sometimes wrong: greedy output still equals the target's, greedy α from Σ min(p, q) (point
    masses) equals the counted α exactly, and the counts are consistent."""
    results, _, _ = speculate(tmp_path, model_dirs["llama_teacher"], one_layer_draft, prompts_file, "--gamma", "2,4",
                              "--eval-data", str(prompts_file))
    held = results["held_out"]["alpha"]
    assert 0 < held < 1 and held == results["held_out"]["top1_agreement"]  # greedy: α is the argmax agreement
    for gamma, row in rows_by_gamma(results).items():
        assert row["greedy_mismatches"] == 0 and row["hf_greedy_mismatches"] == 0
        assert 0 < row["alpha_measured"] < 1
        assert row["alpha_analytic"] == pytest.approx(row["alpha_measured"], rel=1e-6)
        assert row["accepted"] <= row["verified"] <= row["proposed"] <= gamma * row["target_calls"]
        assert 1 <= row["tau"] <= gamma + 1
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / results["baselines"]["target"]["tokens_per_s"],
                                               rel=1e-12)
        rounds = [r for p in results["per_prompt"][f"potstill:{gamma}"] for r in p["rounds"]]
        assert sum(a for _, a in rounds) == row["accepted"] and len(rounds) == row["target_calls"]


def test_sampling_runs_and_reports_no_greedy_check(tmp_path, model_dirs, one_layer_draft, prompts_file):
    results, out, _ = speculate(tmp_path, model_dirs["llama_teacher"], one_layer_draft, prompts_file, "--gamma", "3",
                                "--temperature", "1", "--top-p", "0.9", "--eval-data", str(prompts_file))
    (row,) = results["rows"]
    assert row["greedy_mismatches"] is None and row["hf_greedy_mismatches"] is None and row["hf_tokens_per_s"] > 0
    assert 0 < row["acceptance_rate"] <= 1 and 0 < row["alpha_analytic"] <= 1
    assert 0 < results["held_out"]["alpha"] < 1


def test_without_eval_data_or_hf_the_report_says_so(tmp_path, model_dirs, prompts_file):
    target = model_dirs["llama_teacher"]
    results, out, _ = speculate(tmp_path, target, target, prompts_file, "--gamma", "2", "--no-hf-assisted")
    (row,) = results["rows"]
    assert "hf_tokens_per_s" not in row and results["held_out"] is None
    report = (out / "report.md").read_text()
    assert "Not computed" in report and "HF tokens/s" not in report


@pytest.mark.parametrize("spec, expected", [("4", (4,)), ("1-8", tuple(range(1, 9))), ("4,1,2,2", (1, 2, 4)),
                                            ("1-2,5", (1, 2, 5))])
def test_gamma_specs(spec, expected):
    assert parse_gammas(spec) == expected


def test_bad_inputs_end_in_one_line_and_create_nothing(tmp_path, model_dirs, tokenizer, prompts_file):
    target = str(model_dirs["llama_teacher"])
    other_vocab = save_tiny_model(tmp_path / "other_vocab", "llama", tokenizer, layers=1, vocab=len(tokenizer) + 16)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"prompt": "the cat", "completion": " sat"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--gamma", "0"], "each γ must be between 1 and 8"),
        (["--gamma", "9"], "each γ must be between 1 and 8"),
        (["--gamma", "4-2"], "the range 4-2 is empty"),
        (["--gamma", "two"], "write one γ (4), a range (1-8) or a list (1,2,4)"),
        (["--draft", str(other_vocab)], "its output layer has 495 rows (vocab_size) but the target's has 479"),
        (["--prompts", str(empty)], "empty.jsonl: the dataset is empty"),
        (["--prompts", str(no_prompt)], "no_prompt.jsonl:2: a record needs 'text', 'prompt' and 'completion'"),
        (["--max-new-tokens", "300"], "exceed the models' context of 256 positions"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
    ]
    for args, expected in cases:
        base = {"--target": target, "--draft": target, "--prompts": str(prompts_file)}
        base.update(dict(zip(args[::2], args[1::2])))
        out = tmp_path / "out"
        result = runner.invoke(app, ["speculate", *[x for kv in base.items() for x in kv], "--out", str(out),
                                     "--device", "cpu"], terminal_width=400)
        assert result.exit_code == 2, (args, result.output)
        assert expected in error_line(result), (args, result.output)
        assert not out.exists(), args
