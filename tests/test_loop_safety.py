"""What the loop guarantees when things go wrong: non-finite steps never update the model, a refused run leaves
no trace, train/eval modes are right, progress is readable in a log file, the LR schedule is the library's."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from transformers import get_linear_schedule_with_warmup

import potstill
from potstill import checkpoint, train
from potstill.config import RunConfig
from potstill.guardrails import TokenizerMismatch
from potstill.progress import TrainProgress
from potstill.train import NonFiniteError, RunDirError

from conftest import after_load
from tests.conftest import save_tiny_model


def config(tmp_path, model_dirs, data, *extra, student=None, out="run"):
    student = student or model_dirs["qwen2_student"]
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={student}",
                                      f"data.train={data}", f"out_dir={tmp_path / out}", "data.max_length=48",
                                      "data.max_eval_examples=8", "loss.chunk_size=50", "train.lr=0.01",
                                      "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
                                      "eval.max_new_tokens=3", "device=cpu", *extra])


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def nan_at(monkeypatch, bad_steps, model="student"):
    """The student's (or live teacher's) final hidden states become NaN at the given training steps (1-based).
    Evaluation (student in eval mode) is left alone."""
    calls = {"n": 0}

    def attach(parts):
        def poison(module, args, output):
            if not parts.student.training:
                return None
            calls["n"] += 1
            return output * float("nan") if bad_steps(calls["n"]) else None

        getattr(parts, model).get_decoder().norm.register_forward_hook(poison)

    after_load(monkeypatch, attach)


def finite_weights(model_dir) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(model_dir / "model.safetensors").values())


# ---- non-finite steps ------------------------------------------------------------------------------------------


# A NaN teacher must show in the term that reads it (divergences keep NaN entries instead of treating them as
# probability 0), not only in the gradient norm; either way the step must not reach AdamW.
@pytest.mark.parametrize("model,what", [("student", r"term 'ce' is nan, term 'fkl' is nan \(loss nan, grad norm nan\)"),
                                        ("teacher", r"term 'fkl' is nan \(loss nan, grad norm nan\)")])
def test_nonfinite_stop_names_step_and_term_and_keeps_last_checkpoint(tmp_path, model_dirs, text_jsonl, monkeypatch,
                                                                     model, what):
    nan_at(monkeypatch, lambda step: step == 3, model)
    cfg = config(tmp_path, model_dirs, text_jsonl, "loss.objective=0.5*ce + 0.5*fkl", "train.max_steps=6",
                 "train.save_every=2")
    with pytest.raises(NonFiniteError, match=rf"^step 3: {what}; the last good checkpoint is \S+step-0000002 — ") as err:
        potstill.distill(cfg, progress=False)
    assert "set train.on_nonfinite=skip" in str(err.value)
    run = tmp_path / "run"
    assert not (run / "final").exists() and not (run / "report.md").exists()
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-0000002"]
    assert finite_weights(run / "checkpoints" / "step-0000002")
    assert [r["step"] for r in metric_rows(run)] == [1, 2]  # the bad step was never logged as a train step


def test_nonfinite_skip_drops_the_step_and_finishes(tmp_path, model_dirs, text_jsonl, monkeypatch):
    nan_at(monkeypatch, lambda step: step == 3)
    cfg = config(tmp_path, model_dirs, text_jsonl, "loss.objective=0.5*ce + 0.5*fkl", "train.max_steps=6",
                 "train.save_every=0", "train.on_nonfinite=skip")
    result = potstill.distill(cfg, progress=False)
    rows = metric_rows(result.run_dir)
    assert [(r["step"], r["kind"]) for r in rows if r["kind"] != "eval"] == [(1, "train"), (2, "train"), (3, "skip"),
                                                                            (4, "train"), (5, "train"), (6, "train")]
    skip = next(r for r in rows if r["kind"] == "skip")
    assert skip["reason"] == "term 'ce' is nan, term 'fkl' is nan" and skip["skipped"] == 1
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == [0, 0, 1, 1, 1]
    assert finite_weights(result.final_dir) and math.isfinite(result.metrics["student_ce"])
    state = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(result.run_dir))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}  # AdamW stepped 6 − 1 times
    assert state["scheduler"]["last_epoch"] == 5 and state["skipped"] == 1  # the LR schedule follows updates
    # the schedule did not advance on the skipped step: step 4 uses the lr step 3 would have had (warm-up 1 step)
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert lrs == pytest.approx([0.01 * train.lr_lambda(s, 1, 6, "cosine") for s in range(5)], rel=1e-12)


def test_nonfinite_skip_gives_up_after_consecutive_skips(tmp_path, model_dirs, text_jsonl, monkeypatch):
    nan_at(monkeypatch, lambda step: step >= 2)
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=30", "train.save_every=0", "train.on_nonfinite=skip")
    with pytest.raises(NonFiniteError, match=rf"^step {1 + train.MAX_CONSECUTIVE_SKIPS}: term 'fkl' is nan .*the "
                                             rf"{train.MAX_CONSECUTIVE_SKIPS}th non-finite step in a row"):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run" / "final").exists()
    assert [r["kind"] for r in metric_rows(tmp_path / "run")].count("skip") == train.MAX_CONSECUTIVE_SKIPS - 1


def test_nonfinite_problems_names_what_is_not_finite():
    objective = RunConfig.from_yaml(None, ["loss.objective=0.5*ce + 0.5*rkl + 0.1*rkl", "teacher.path=x",
                                           "student.path=y"]).objective()
    assert train.nonfinite_problems(objective, 1.0, [1.0, 2.0, 3.0], 0.5) == []
    assert train.nonfinite_problems(objective, math.nan, [1.0, math.inf, math.nan], 0.5) == [
        "term 'rkl#1' is inf", "term 'rkl#2' is nan"]
    assert train.nonfinite_problems(objective, 1.0, [1.0, 2.0, 3.0], math.inf) == ["the gradient norm is inf"]
    with pytest.raises(ValueError, match="train.on_nonfinite='ignore': use stop or skip"):
        RunConfig.from_yaml(None, ["teacher.path=x", "student.path=y", "train.on_nonfinite=ignore"])


# ---- train / eval modes ----------------------------------------------------------------------------------------


def test_student_trains_in_train_mode_and_frozen_models_stay_in_eval(tmp_path, model_dirs, text_jsonl, monkeypatch,
                                                                    dropout_student):
    seen = {"loaded_training": None, "student": [], "teacher": []}

    def record(parts):
        seen["loaded_training"] = parts.student.training  # from_pretrained gives eval mode
        parts.student.get_decoder().layers[0].register_forward_pre_hook(lambda m, a: seen["student"].append(m.training))
        parts.teacher.get_decoder().layers[0].register_forward_pre_hook(lambda m, a: seen["teacher"].append(m.training))

    after_load(monkeypatch, record)
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=3", "train.save_every=0", student=dropout_student)
    potstill.distill(cfg, progress=False)
    assert seen["loaded_training"] is False
    assert seen["student"][:3] == [True, True, True]  # the three training steps
    assert not any(seen["student"][3:])  # evaluation and the sample
    assert seen["teacher"] and not any(seen["teacher"])


# ---- the run directory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["missing data", "missing model", "tokenizer mismatch"])
def test_refused_run_leaves_nothing_behind(tmp_path, model_dirs, text_jsonl, tokenizer, problem):
    student, data = model_dirs["qwen2_student"], text_jsonl
    if problem == "missing data":
        data = tmp_path / "nope.jsonl"
    elif problem == "missing model":
        student = tmp_path / "no-model"
    else:  # a qwen2 directory with our tokenizer loads as Qwen2Tokenizer, which encodes differently
        student = save_tiny_model(tmp_path / "qwen2_tok", "qwen2", tokenizer, with_tokenizer=True)
    cfg = config(tmp_path, model_dirs, data, "train.max_steps=2", student=student)
    with pytest.raises((FileNotFoundError, OSError, ValueError, TokenizerMismatch)):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_overwrite_replaces_the_old_run_only_after_loading(tmp_path, model_dirs, text_jsonl):
    good = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=2")
    first = potstill.distill(good, progress=False)
    before = (first.run_dir / "metrics.jsonl").read_text()
    bad = config(tmp_path, model_dirs, tmp_path / "nope.jsonl", "train.max_steps=2")
    with pytest.raises(FileNotFoundError):
        potstill.distill(bad, overwrite=True, progress=False)
    assert (first.run_dir / "metrics.jsonl").read_text() == before and (first.final_dir / "model.safetensors").exists()
    (first.run_dir / "stale.txt").write_text("from the old run")
    potstill.distill(config(tmp_path, model_dirs, text_jsonl, "train.max_steps=3"), overwrite=True, progress=False)
    assert not (first.run_dir / "stale.txt").exists()
    assert [r["step"] for r in metric_rows(first.run_dir) if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.parametrize("contents,blocks", [((), False), (("config.yaml",), False), (("config.yaml", "notes.txt"), False),
                                             (("metrics.jsonl",), True), (("checkpoints/",), True), (("final/",), True)])
def test_which_contents_block_a_new_run(tmp_path, model_dirs, text_jsonl, contents, blocks):
    run = tmp_path / "run"
    run.mkdir()
    for name in contents:
        (run / name).mkdir() if name.endswith("/") else (run / name).write_text("stale: a run that died before step 1\n")
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=1")
    if blocks:
        with pytest.raises(RunDirError, match=f"already holds a run; .*found {contents[0].rstrip('/')}"):
            potstill.distill(cfg, progress=False)
    else:
        result = potstill.distill(cfg, progress=False)
        assert (result.final_dir / "model.safetensors").exists()
        assert (run / "config.yaml").read_text() == cfg.to_yaml()


# ---- progress --------------------------------------------------------------------------------------------------


def test_progress_prints_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    assert not console.is_terminal
    with TrainProgress(5, 0, every=2, console=console) as bar:
        for step in range(1, 6):
            bar.update(step, 3.0 + step / 10, 1000.0 * step)
        bar.note("step 5: held-out CE 3.1000")
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[:3] for line in lines[:3]] == [["step 2/5", "loss 3.2000", "2,000 tok/s"],
                                                            ["step 4/5", "loss 3.4000", "4,000 tok/s"],
                                                            ["step 5/5", "loss 3.5000", "5,000 tok/s"]]
    assert all(" ETA " in line for line in lines[:3]) and lines[3] == "step 5: held-out CE 3.1000" and len(lines) == 4


def test_distill_logs_progress_lines_to_a_non_terminal_stderr(tmp_path, model_dirs, text_jsonl, capsys):
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", "train.log_every=2", "train.save_every=0")
    potstill.distill(cfg, progress=True)
    err = capsys.readouterr().err
    assert [line.split("  ")[0] for line in err.splitlines() if line.startswith("step ") and "/4" in line] == ["step 2/4", "step 4/4"]


# ---- learning-rate schedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,library", [("cosine", get_cosine_schedule_with_warmup),
                                              ("linear", get_linear_schedule_with_warmup),
                                              ("constant", get_constant_schedule_with_warmup)])
def test_lr_schedule_matches_transformers_after_warmup(schedule, library):
    """Ours equals transformers' schedule from the end of warm-up on; during warm-up ours is one step ahead
    (lr·(s+1)/w instead of lr·s/w), so the first step is not a wasted lr = 0 step."""
    warmup, total = 4, 20

    def lrs(make):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    cfg = RunConfig.from_yaml(None, ["teacher.path=x", "student.path=y", f"train.warmup_steps={warmup}",
                                     f"train.max_steps={total}", f"train.schedule={schedule}"])
    ours = lrs(lambda opt: train.LambdaLR(opt, lambda s: train.lr_lambda(s, warmup, total, schedule)))
    theirs = lrs(lambda opt: library(opt, warmup) if schedule == "constant" else library(opt, warmup, total))
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12)
    assert ours[: warmup - 1] == pytest.approx(theirs[1:warmup], rel=1e-12) and theirs[0] == 0 < ours[0]
    assert cfg.train.resolved_warmup() == warmup
    assert RunConfig.from_yaml(None, ["teacher.path=x", "student.path=y", "train.max_steps=30"]).train.resolved_warmup() == 2
