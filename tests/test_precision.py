"""Mixed precision (fp32 master weights + autocast, fp16 grad scaler) and gradient checkpointing (docs/precision.md)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import potstill
from potstill import checkpoint, precision, runtime, train
from potstill.assemble import load_examples, load_parts
from potstill.config import RunConfig
from potstill.data.batches import Batcher
from potstill.precision import resolve_model_dtype, resolve_precision
from potstill.train import NonFiniteError, batch_loss, make_optimizer, train_step

from conftest import after_load, seams

CPU = torch.device("cpu")


def config(tmp_path, model_dirs, data, *extra, student=None):
    student = student or model_dirs["qwen2_student"]
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={student}",
                                      f"data.train={data}", f"out_dir={tmp_path / 'run'}", "data.max_length=48",
                                      "data.max_eval_examples=8", "loss.chunk_size=50", "train.lr=0.01",
                                      "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
                                      "eval.max_new_tokens=3", "device=cpu", "loss.objective=0.5*ce + 0.5*fkl", *extra])


def rows(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def setup_step(cfg):
    """The real parts, a batch, AdamW and the run's Amp, as distill builds them."""
    torch.manual_seed(0)
    parts = load_parts(cfg, CPU)
    train_examples, _ = load_examples(cfg, parts.tokenizer)
    batch = Batcher(train_examples, cfg.train.batch_size, 0, parts.tokenizer.pad_token_id).next_batch()
    parts.student.train()
    optimizer, scheduler = make_optimizer(cfg, parts.student)
    return parts, batch, optimizer, scheduler, precision.setup(cfg, CPU, parts.student)


def loss_and_grads(parts, batch, objective, amp):
    parts.student.zero_grad(set_to_none=True)
    out = batch_loss(parts, seams(parts), batch, objective, 50, amp=amp)
    out.total.backward()
    return out.total.item(), {n: p.grad.clone() for n, p in parts.student.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- resolving `auto` ------------------------------------------------------------------------------------------


def test_auto_resolves_to_bf16_only_on_a_cuda_device_with_bf16():
    assert resolve_precision("auto", CPU) == "fp32" and resolve_model_dtype("auto", CPU) == "float32"
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda, bf16_ok=True) == "bf16"
    assert resolve_model_dtype("auto", cuda, bf16_ok=True) == "bfloat16"
    assert resolve_precision("auto", cuda, bf16_ok=False) == "fp32"  # e.g. a V100: fp32, fp16 only when asked
    assert resolve_model_dtype("auto", cuda, bf16_ok=False) == "float32"
    assert resolve_precision("fp16", CPU) == "fp16" and resolve_model_dtype("float16", CPU) == "float16"


def test_teacher_dtype_auto_is_the_default_and_loads_fp32_on_cpu(model_dirs, text_jsonl, tmp_path):
    cfg = config(tmp_path, model_dirs, text_jsonl)
    assert cfg.teacher.dtype == "auto" and cfg.train.precision == "auto"
    parts = load_parts(cfg, CPU)
    assert {p.dtype for p in parts.teacher.parameters()} == {torch.float32}


# ---- bf16 autocast ---------------------------------------------------------------------------------------------


def test_bf16_autocast_is_close_to_fp32_and_gradients_reach_fp32_master_weights(tmp_path, model_dirs, text_jsonl):
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.precision=bf16")
    parts, batch, _, _, amp = setup_step(cfg)
    assert amp.precision == "bf16" and amp.scaler is None
    objective = cfg.objective()
    full_loss, full = loss_and_grads(parts, batch, objective, precision.FULL)
    half_loss, half = loss_and_grads(parts, batch, objective, amp)
    assert half_loss != full_loss  # autocast really ran in bf16 ...
    # ... and stays within bf16 rounding: 8 significand bits, 2^-9 ≈ 2e-3 relative per rounding, compounded over
    # the layers. Measured on this model: loss 3e-6 relative (near-uniform logits of a random model), gradients
    # ≤ 9e-3 relative per parameter (norm of the difference over the norm; fp16 autocast: 1e-3, its 3 extra bits).
    assert half_loss == pytest.approx(full_loss, rel=1e-4)
    assert {p.dtype for p in parts.student.parameters()} == {torch.float32}
    assert {g.dtype for g in half.values()} == {torch.float32}
    for name, grad in half.items():
        assert rel_err(grad, full[name]) < 3e-2, name


def test_bf16_run_keeps_fp32_weights_and_adamw_state(tmp_path, model_dirs, text_jsonl):
    result = potstill.distill(config(tmp_path, model_dirs, text_jsonl, "train.precision=bf16", "train.max_steps=4"),
                              progress=False)
    fp32 = potstill.distill(config(tmp_path / "fp32", model_dirs, text_jsonl, "train.precision=fp32",
                                   "train.max_steps=4"), progress=False)
    bf16_losses, fp32_losses = [r["loss"] for r in rows(result.run_dir)], [r["loss"] for r in rows(fp32.run_dir)]
    assert all(math.isfinite(v) for v in bf16_losses)
    assert bf16_losses == pytest.approx(fp32_losses, rel=2e-3)  # measured ≤ 3e-4 over 4 steps at lr 0.01
    state = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(result.run_dir))
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    assert state["amp"]["precision"] == "bf16"
    assert {t.dtype for t in load_file(result.final_dir / "model.safetensors").values()} == {torch.float32}


# ---- fp16 + grad scaler ----------------------------------------------------------------------------------------


def inf_gradient_at(model, bad_calls):
    """The final norm's weight gets an inf gradient in the given backward passes (1-based)."""
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] in bad_calls else grad

    model.get_decoder().norm.weight.register_hook(poison)


def test_fp16_scaler_skips_an_inf_gradient_step_without_the_nonfinite_guard(tmp_path, model_dirs, text_jsonl):
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.precision=fp16")  # train.on_nonfinite=stop
    parts, batch, optimizer, scheduler, amp = setup_step(cfg)
    inf_gradient_at(parts.student, {2})
    rt, objective = runtime.Runtime(CPU), cfg.objective()
    par = seams(parts)
    weights = lambda: [p.detach().clone() for p in parts.student.parameters()]  # noqa: E731
    scale, before = amp.scaler.get_scale(), weights()
    stats, _, _ = train_step(parts, par, [batch], objective, cfg, rt, optimizer, scheduler, amp)
    assert stats["grad_scale"] == scale and scheduler.last_epoch == 1  # a normal fp16 step updates ...
    assert all(not torch.equal(a, b) for a, b in zip(weights(), before))  # ... every weight
    before = weights()
    stats, _, _ = train_step(parts, par, [batch], objective, cfg, rt, optimizer, scheduler, amp)
    assert "nonfinite" not in stats and math.isinf(stats["grad_norm"]) and math.isfinite(stats["loss"])
    assert stats["grad_scale"] == scale / 2 and scheduler.last_epoch == 1  # skipped by the scaler, LR not advanced
    assert all(torch.equal(a, b) for a, b in zip(weights(), before))
    assert all(int(s["step"]) == 1 for s in optimizer.state.values())
    stats, _, _ = train_step(parts, par, [batch], objective, cfg, rt, optimizer, scheduler, amp)  # and training goes on
    assert stats["grad_scale"] == scale / 2 and scheduler.last_epoch == 2
    assert all(not torch.equal(a, b) for a, b in zip(weights(), before))


def test_fp16_run_goes_on_through_an_inf_gradient_but_stops_on_a_nan_loss(tmp_path, model_dirs, text_jsonl,
                                                                         monkeypatch):
    after_load(monkeypatch, lambda parts: inf_gradient_at(parts.student, {2}))
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.precision=fp16", "train.max_steps=4", "train.save_every=0")
    result = potstill.distill(cfg, progress=False)
    logged = rows(result.run_dir)
    assert [r["grad_scale"] for r in logged] == [65536.0, 32768.0, 32768.0, 32768.0]
    assert not rows(result.run_dir, "skip") and all(r["skipped"] == 0 for r in logged)
    state = checkpoint.load_trainer_state(checkpoint.latest_checkpoint(result.run_dir))
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # AdamW stepped 4 − 1 times
    assert state["scheduler"]["last_epoch"] == 3 and state["amp"]["scaler"]["scale"] == 32768.0

    def nan_hidden(parts):  # the student's final hidden states become NaN at training step 2: a NaN loss
        calls = {"n": 0}

        def poison(module, args, output):
            calls["n"] += parts.student.training
            return output * float("nan") if parts.student.training and calls["n"] == 2 else None

        parts.student.get_decoder().norm.register_forward_hook(poison)

    after_load(monkeypatch, nan_hidden)
    cfg = config(tmp_path / "nan", model_dirs, text_jsonl, "train.precision=fp16", "train.max_steps=4")
    with pytest.raises(NonFiniteError, match=r"^step 2: term 'ce' is nan, term 'fkl' is nan \(loss nan"):
        potstill.distill(cfg, progress=False)


def crash_after(run_dir, step: int) -> None:
    """Make a finished run look like one killed after ``step`` (its newest checkpoint)."""
    for path in checkpoint.list_checkpoints(run_dir):
        if int(path.name.removeprefix(checkpoint.STEP_PREFIX)) > step:
            shutil.rmtree(path)
    shutil.rmtree(run_dir / "final")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))


def test_fp16_resume_restores_the_grad_scaler(tmp_path, model_dirs, text_jsonl, monkeypatch):
    with monkeypatch.context() as patch:  # only the first run sees the inf gradient (scale 65536 → 32768 at step 2)
        after_load(patch, lambda parts: inf_gradient_at(parts.student, {2}))
        cfg = config(tmp_path, model_dirs, text_jsonl, "train.precision=fp16", "train.max_steps=6", "train.save_every=2",
                     "train.keep_checkpoints=3")
        full = rows(potstill.distill(cfg, progress=False).run_dir)
    crash_after(tmp_path / "run", 4)
    again = rows(potstill.distill(cfg, resume=True, progress=False).run_dir)
    assert [r["grad_scale"] for r in again] == [r["grad_scale"] for r in full] == [65536.0] + [32768.0] * 5
    assert [r["loss"] for r in again] == [r["loss"] for r in full]  # bit-identical


# ---- gradient checkpointing ------------------------------------------------------------------------------------


def count_forward_calls(module: nn.Module) -> list:
    """A list that grows by one per call of ``module.forward``. Not a forward hook: transformers 5 checkpoints a
    layer's ``forward`` (so its hooks run once), and torch 2.13 runs no module hooks while recomputing."""
    calls, forward = [], module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(tmp_path, model_dirs, text_jsonl,
                                                                              dropout_student):
    """The student has attention dropout 0.5: the recomputation must replay the same dropout masks."""
    cfg = config(tmp_path, model_dirs, text_jsonl, student=dropout_student)
    parts, batch, _, _, amp = setup_step(cfg)
    calls = count_forward_calls(parts.student.get_decoder().layers[0].mlp)
    torch.manual_seed(1)
    plain_loss, plain = loss_and_grads(parts, batch, cfg.objective(), amp)
    assert len(calls) == 1
    precision.enable_gradient_checkpointing(parts.student)  # what train.gradient_checkpointing=true does
    calls.clear()
    torch.manual_seed(1)
    loss, grads = loss_and_grads(parts, batch, cfg.objective(), amp)
    assert len(calls) == 2  # forward, then recomputed in backward: checkpointing applies on models.hidden_states
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in grads.items():
        assert rel_err(grad, plain[name]) < 1e-5, name
    parts.student.eval()
    calls.clear()
    with torch.no_grad():
        batch_loss(parts, seams(parts), batch, cfg.objective(), 50)
    assert len(calls) == 1  # evaluation (eval mode, no grad) does not checkpoint


def test_resume_may_turn_on_checkpointing_but_not_change_the_precision(tmp_path, model_dirs, text_jsonl,
                                                                        dropout_student):
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", "train.save_every=2", student=dropout_student)
    full = rows(potstill.distill(cfg, progress=False).run_dir)
    crash_after(tmp_path / "run", 2)
    bf16 = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", "train.save_every=2",
                  "train.precision=bf16", student=dropout_student)
    with pytest.raises(ValueError, match=r"^--resume: \S+step-0000002 was trained with train.precision=fp32, but "
                                         r"train.precision=bf16 gives bf16 on this device; pass train.precision=fp32"):
        potstill.distill(bf16, resume=True, progress=False)
    # auto → fp32 resolves the same on the CPU, and checkpointing is memory only: the trajectory is the same
    same = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", "train.save_every=2", "train.precision=fp32",
                  "train.gradient_checkpointing=true", student=dropout_student)
    again = rows(potstill.distill(same, resume=True, progress=False).run_dir)
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in full], rel=1e-6)


# ---- refused combinations --------------------------------------------------------------------------------------


BASE = ["distill", "--teacher", "x", "--init-layers", "1"]  # fails at config load, before any model is touched


@pytest.mark.parametrize("args, expected", [
    (BASE + ["train.precision=fp8"], "train.precision='fp8': use auto, fp32, bf16, fp16"),
    (BASE + ["train.precision=fp16", "student.dtype=bfloat16"],
     "train.precision=fp16 with student.dtype=bfloat16: fp16 autocast needs master weights in float32; set "
     "student.dtype=float32"),
    (BASE + ["train.precision=fp16", "student.dtype=float16"], "train.precision=fp16 with student.dtype=float16"),
    (BASE + ["train.precision=bf16", "student.dtype=float16"],
     "bf16 autocast needs master weights in float32 or bfloat16"),
    (BASE + ["teacher.dtype=fp16"], "teacher.dtype='fp16': use auto, float32, bfloat16, float16"),
    (BASE + ["student.dtype=auto"], "student.dtype='auto': use float32, bfloat16, float16"),
    (BASE + ["train.gradient_checkpointing=maybe"], "'train.gradient_checkpointing' expects bool, got 'maybe'"),
], ids=["precision", "fp16-bf16-weights", "fp16-fp16-weights", "bf16-fp16-weights", "teacher-dtype", "student-dtype",
        "checkpointing"])
def test_precision_mistakes_end_in_one_line(args, expected):
    from typer.testing import CliRunner

    from potstill.cli import app

    result = CliRunner().invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert expected in lines[0]


def test_refusals_that_need_the_device_or_the_model():
    with pytest.raises(ValueError, match=r"^train.precision=bf16 with student.dtype=float16 \(train.precision=auto "
                                         r"resolved to bf16 on this device\): "):
        precision.check_student_dtype("bf16", "float16", "auto")
    with pytest.raises(ValueError, match=r"^train.gradient_checkpointing: Linear does not support gradient "
                                         r"checkpointing; set train.gradient_checkpointing=false$"):
        precision.enable_gradient_checkpointing(nn.Linear(2, 2))
    precision.check_device("fp16", CPU)  # fp16 and bf16 autocast both run on the CPU (torch 2.13)
    precision.check_device("bf16", CPU)
