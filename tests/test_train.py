"""End-to-end CPU runs with tiny random HF models of two architectures, loaded from local directories."""
from __future__ import annotations

import json

import pytest
import yaml
import torch
from transformers import AutoModelForCausalLM

import potstill
from potstill import runtime
from potstill.assemble import load_examples, load_parts
from potstill.config import RunConfig
from potstill.data.batches import Batcher, collate
from potstill.losses.reduce import count_valid_tokens, normalise
from potstill.train import RunDirError, batch_loss, shifted

from conftest import seams


def run_config(tmp_path, model_dirs, data, teacher="llama_teacher", student="qwen2_student", **train):
    """``student``: a key of ``model_dirs`` or a model directory."""
    overrides = [f"teacher.path={model_dirs[teacher]}", f"student.path={model_dirs.get(student, student)}", f"data.train={data}",
                 f"out_dir={tmp_path / 'run'}", "data.max_length=64", "data.max_eval_examples=16", "loss.chunk_size=50",
                 "train.lr=0.01", "train.log_every=1", "eval.max_new_tokens=5", "device=cpu"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return RunConfig.from_yaml(None, overrides)


def metric_lines(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("teacher,student", [("llama_teacher", "qwen2_student"), ("gpt2_teacher", "gpt2_student")])
def test_distill_end_to_end(tmp_path, model_dirs, text_jsonl, teacher, student):
    cfg = run_config(tmp_path, model_dirs, text_jsonl, teacher, student, max_steps=30, batch_size=8, eval_every=15, save_every=15)
    result = potstill.distill(cfg, progress=False)
    train = metric_lines(result.run_dir, "train")
    assert len(train) == 30
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    evals = metric_lines(result.run_dir, "eval")
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["kl_teacher_student"] < evals[0]["kl_teacher_student"]
    for key in ("student_ce", "teacher_ce", "top1_agreement", "ece"):
        assert key in evals[-1]
    for name in ("report.md", "config.yaml", "final/model.safetensors", "final/tokenizer.json",
                 "final/potstill/config.yaml", "plots"):
        assert (result.run_dir / name).exists(), name
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert loaded.config.model_type == AutoModelForCausalLM.from_pretrained(model_dirs[student]).config.model_type
    ckpts = sorted((result.run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-0000015", "step-0000030"]
    assert (ckpts[0] / "potstill" / "trainer_state.pt").exists()


@pytest.mark.parametrize("objective,schedule", [("0.5*ce + 0.5*gjsd(beta=0.5)", "fixed"), ("taid(alpha=0.2)", "fixed"),
                                                ("fkl", "dts(t_min=1, t_max=4, momentum=0.5)")])
def test_resume_gives_identical_losses(tmp_path, model_dirs, text_jsonl, dropout_student, objective, schedule):
    """The student has dropout 0.5, so the losses also depend on the torch RNG stream coming back."""
    cfg = run_config(tmp_path, model_dirs, text_jsonl, student=dropout_student, max_steps=8, batch_size=4, save_every=4,
                     eval_every=0, keep_checkpoints=3)
    cfg.loss.objective, cfg.loss.temperature_schedule, cfg.loss.temperature = objective, schedule, 3.0
    full = potstill.distill(cfg, progress=False)
    uninterrupted = metric_lines(full.run_dir, "train")
    # Simulate a crash after step 6: the step-8 checkpoint and final student never got written.
    import shutil

    shutil.rmtree(full.run_dir / "checkpoints" / "step-0000008")
    shutil.rmtree(full.run_dir / "final")
    lines = (full.run_dir / "metrics.jsonl").read_text().splitlines()
    (full.run_dir / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 6) + "\n")
    resumed = potstill.distill(cfg, resume=True, progress=False)
    again = metric_lines(resumed.run_dir, "train")
    assert [r["step"] for r in again] == list(range(1, 9))
    assert [r["loss"] for r in again] == [r["loss"] for r in uninterrupted]  # bit-identical
    if objective.startswith("taid"):  # the schedule's state came back with the checkpoint
        assert [r["taid/t"] for r in again] == [r["taid/t"] for r in uninterrupted]
        assert again[-1]["taid/t"] > again[0]["taid/t"]
    if schedule.startswith("dts"):  # the temperature decays with the cosine and came back with the checkpoint
        assert [r["temperature"] for r in again] == [r["temperature"] for r in uninterrupted]
        assert again[-1]["temperature"] < again[0]["temperature"] == 3.0


def _crashed_after_step_2(run_dir):
    """Make a finished 4-step run (checkpoints every 2) look like one killed after step 3."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-0000004")
    shutil.rmtree(run_dir / "final")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 3) + "\n")


def test_resume_refuses_settings_that_change_the_trajectory(tmp_path, model_dirs, text_jsonl):
    cfg = run_config(tmp_path, model_dirs, text_jsonl, max_steps=4, batch_size=4, save_every=2, eval_every=0)
    potstill.distill(cfg, progress=False)
    _crashed_after_step_2(tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    changed = run_config(tmp_path, model_dirs, text_jsonl, max_steps=3, batch_size=4, save_every=2, eval_every=0, lr=0.02,
                         seed=1)
    changed.loss.objective = "rkl"
    with pytest.raises(RunDirError, match=r"other settings \(loss.objective: 'fkl' → 'rkl'; train.lr: 0.01 → 0.02; "
                                          r"train.max_steps: 4 → 3; train.seed: 0 → 1\)"):
        potstill.distill(changed, resume=True, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    # cadence, evaluation and placement may change, and max_steps may grow (the schedules stretch to the new total)
    extended = run_config(tmp_path, model_dirs, text_jsonl, max_steps=6, batch_size=4, save_every=3, eval_every=5,
                          log_every=2, keep_checkpoints=1)
    extended.eval.max_new_tokens, extended.loss.chunk_size = 2, 30
    result = potstill.distill(extended, resume=True, progress=False)
    assert [r["step"] for r in metric_lines(result.run_dir, "train")] == [1, 2, 4, 6]  # logged every 2 after step 2
    assert [r["step"] for r in metric_lines(result.run_dir, "eval")] == [5, 6]
    assert RunConfig.from_yaml(result.run_dir / "config.yaml").train.max_steps == 6


def test_resume_of_a_run_whose_config_predates_new_keys(tmp_path, model_dirs, text_jsonl):
    """A config.yaml written before a section or key existed resumes when the new keys stay at their defaults,
    and is refused, naming the key, when one of them would change the trajectory."""
    cfg = run_config(tmp_path, model_dirs, text_jsonl, max_steps=4, batch_size=4, save_every=2, eval_every=0)
    potstill.distill(cfg, progress=False)
    _crashed_after_step_2(tmp_path / "run")
    saved = tmp_path / "run" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    for section in ("hidden", "teachers", "task"):
        del old[section]
    del old["student"]["tokenizer"]
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    changed = run_config(tmp_path, model_dirs, text_jsonl, max_steps=4, batch_size=4, save_every=2, eval_every=0)
    changed.hidden.weight = 1.0
    with pytest.raises(RunDirError, match=r"other settings \(hidden.weight: '\(unset\)' → 1.0\)"):
        potstill.distill(changed, resume=True, progress=False)
    result = potstill.distill(cfg, resume=True, progress=False)
    assert [r["step"] for r in metric_lines(result.run_dir, "train")][-1] == 4


def test_cli_resume_with_only_out_continues_from_the_runs_config(tmp_path, model_dirs, text_jsonl):
    from typer.testing import CliRunner

    from potstill.cli import app

    out = tmp_path / "run"
    args = ["distill", "--teacher", str(model_dirs["llama_teacher"]), "--student", str(model_dirs["qwen2_student"]),
            "--data", str(text_jsonl), "--steps", "4", "--out", str(out), "data.max_length=48", "data.max_eval_examples=8",
            "train.save_every=2", "train.log_every=1", "train.batch_size=4", "eval.max_new_tokens=3", "device=cpu"]
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    uninterrupted = metric_lines(out, "train")
    _crashed_after_step_2(out)
    result = runner.invoke(app, ["distill", "--resume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [r["loss"] for r in metric_lines(out, "train")] == [r["loss"] for r in uninterrupted]
    assert (out / "final" / "model.safetensors").exists()
    refused = runner.invoke(app, ["distill", "--resume", "--out", str(out), "train.batch_size=8"], terminal_width=400)
    assert refused.exit_code == 2 and "train.batch_size: 4 → 8" in refused.output
    missing = runner.invoke(app, ["distill", "--resume", "--out", str(tmp_path / "nothing")], terminal_width=400)
    assert missing.exit_code == 2 and "config.yaml does not exist" in missing.output


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_4x2_equals_batch_8(tmp_path, model_dirs, text_jsonl):
    cfg = run_config(tmp_path, model_dirs, text_jsonl)
    parts = load_parts(cfg, torch.device("cpu"))
    train, _ = load_examples(cfg, parts.tokenizer)
    big = Batcher(train, 8, 0, parts.tokenizer.pad_token_id).next_batch()
    chosen = _examples_of(big, train)
    small = [collate(chosen[i : i + 2], parts.tokenizer.pad_token_id) for i in range(0, 8, 2)]
    objective = cfg.objective()
    par = seams(parts)

    out = batch_loss(parts, par, big, objective, 50)
    normalise(out.total, count_valid_tokens([shifted(big)])).backward()
    whole = _grads(parts.student)
    parts.student.zero_grad(set_to_none=True)

    count = count_valid_tokens([shifted(b) for b in small])
    assert count == count_valid_tokens([shifted(big)])
    for b in small:
        normalise(batch_loss(parts, par, b, objective, 50).total, count).backward()
    accumulated = _grads(parts.student)
    assert whole.keys() == accumulated.keys()
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)


def _examples_of(batch, examples):
    by_id = {e.example_id: e for e in examples}
    return [by_id[int(i)] for i in batch["example_id"]]


def test_ce_only_run_needs_no_teacher(tmp_path, model_dirs, text_jsonl):
    cfg = RunConfig.from_yaml(None, [f"student.path={model_dirs['gpt2_student']}", f"data.train={text_jsonl}",
                                     "loss.objective=ce", f"out_dir={tmp_path / 'ce'}", "train.max_steps=3",
                                     "data.max_eval_examples=8", "eval.max_new_tokens=3"])
    result = potstill.distill(cfg, progress=False)
    assert "teacher_ce" not in result.metrics and result.metrics["student_ce"] > 0


def test_seed_everything_is_reproducible():
    runtime.seed_everything(3)
    a = torch.rand(3)
    runtime.seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_quickstart_kd_beats_ce_only(tmp_path):
    """The claim `make quickstart` makes, checked on every CI run (about a minute on 2 cores)."""
    from potstill.quickstart import run_quickstart

    results = run_quickstart(tmp_path / "qs")
    assert results["kd"]["student_ce"] < results["ce-only"]["student_ce"]
    assert (tmp_path / "qs" / "comparison.md").exists()
    assert (tmp_path / "qs" / "kd" / "report.md").exists()


@pytest.mark.parametrize("select", ["entropy(keep=0.5)", "tsd", "reference(keep=0.4)"])
def test_token_selection_in_a_run(tmp_path, model_dirs, text_jsonl, select):
    cfg = run_config(tmp_path, model_dirs, text_jsonl, max_steps=3, batch_size=4, eval_every=0)
    cfg.loss.select = select
    if select.startswith("reference"):
        cfg.loss.reference = str(model_dirs["qwen2_student"])  # any same-tokenizer model works as a reference
    cfg.validate()
    result = potstill.distill(cfg, progress=False)
    train = metric_lines(result.run_dir, "train")
    expected = {"entropy": 0.5, "tsd": 1.0, "reference": 0.4}[select.split("(")[0]]
    assert all(abs(r["select/kept_fraction"] - expected) < 0.02 for r in train), [r["select/kept_fraction"] for r in train]
    if select == "tsd":  # soft weights around 1: σ(ΔH) rescaled to mean 1
        assert all(0 < r["select/weight_min"] < 1 < r["select/weight_max"] < 2 for r in train)
    else:  # hard selection: dropped tokens 0, kept ones 1/keep
        assert all(r["select/weight_min"] == 0 and r["select/weight_max"] == pytest.approx(1 / expected, rel=0.05) for r in train)


def test_reference_setting_is_checked_at_load(model_dirs):
    base = [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['qwen2_student']}"]
    with pytest.raises(ValueError, match="needs loss.reference"):
        RunConfig.from_yaml(None, base + ["loss.select=reference"])
    with pytest.raises(ValueError, match="only used by the 'reference' token selector"):
        RunConfig.from_yaml(None, base + [f"loss.reference={model_dirs['qwen2_student']}"])
