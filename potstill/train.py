"""The one training loop: batch → teacher signal → fused loss → step → eval → checkpoint.

Every regime (live teacher now; cache and on-policy later) differs only in how ``teacher_signal`` builds the
target; the loss path, normalisation, evaluation and checkpointing are shared.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoModelForCausalLM

from potstill import checkpoint, runtime
from potstill.assemble import Parts, load_examples, load_parts
from potstill.config import RunConfig
from potstill.data.batches import Batcher, eval_batches
from potstill.evaluate import evaluate, generate_sample
from potstill.io import atomic_write_text
from potstill.losses.chunked import LossOutput, fused_loss, should_compile
from potstill.losses.objective import Objective
from potstill.losses.reduce import count_valid_tokens, normalise
from potstill.losses.targets import TeacherHidden
from potstill.models import hidden_states, output_head
from potstill.progress import TrainProgress
from potstill.report import write_report
from potstill.cache.run import check_examples_cached
from potstill.cache.targets import batch_target


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    metrics: dict = field(default_factory=dict)  # the last evaluation's metrics


class RunDirError(RuntimeError):
    pass


def prepare_run_dir(out_dir: str, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(out_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(run_dir)
    if resume and checkpoint.latest_checkpoint(run_dir) is None:
        raise RunDirError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def make_optimizer(cfg: RunConfig, model) -> tuple[torch.optim.Optimizer, LambdaLR]:
    t = cfg.train
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    sched = LambdaLR(opt, lambda s: lr_lambda(s, t.warmup_steps, t.max_steps, t.schedule))
    return opt, sched


def shifted(batch: dict) -> torch.Tensor:
    """Labels (B, T-1) for the predictions at positions 0..T-2: position t predicts token t+1."""
    return batch["labels"][:, 1:]


def frozen_signal(model, batch: dict, vocab: int) -> TeacherHidden:
    """A frozen model's (teacher's, reference's) hidden states and head for the predicted positions."""
    with torch.no_grad():
        h = hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    weight, bias = output_head(model, vocab)
    return TeacherHidden(h.reshape(-1, h.shape[-1]), weight, bias)


def teacher_target(parts: Parts, batch: dict, objective: Objective):
    """The teacher signal for this batch: looked up in the cache by example id, or the live teacher's states."""
    if not objective.needs_teacher:
        return None
    if parts.cache is not None:
        return batch_target(parts.cache, batch, parts.vocab)
    return frozen_signal(parts.teacher, batch, parts.vocab)


def batch_loss(parts: Parts, batch: dict, objective: Objective, chunk_size: int, compiled: bool = False) -> LossOutput:
    h = hidden_states(parts.student, batch["input_ids"], batch["attention_mask"])[:, :-1]
    weight, bias = output_head(parts.student, parts.vocab)
    target = teacher_target(parts, batch, objective)
    reference = frozen_signal(parts.reference, batch, parts.vocab) if parts.reference is not None else None
    return fused_loss(h, weight, bias, shifted(batch), objective, target, chunk_size=chunk_size, reference=reference,
                      compiled=compiled)


def train_step(parts, batches, objective, cfg, rt, optimizer, scheduler) -> tuple[dict, list[float], tuple]:
    """One optimiser step over ``grad_accum`` micro-batches, normalised by the step's global token count."""
    count = count_valid_tokens([shifted(b) for b in batches], rt.all_reduce_sum)
    term_sums, nll_sums = torch.zeros(len(objective.terms)), torch.zeros(2)
    loss, kept, low, high = 0.0, 0, float("inf"), float("-inf")
    compiled = should_compile(cfg.loss.compile, objective, rt.device, parts.vocab)
    for batch in batches:
        out = batch_loss(parts, batch, objective, cfg.loss.chunk_size, compiled)
        step_loss = normalise(out.total, count)
        step_loss.backward()
        loss += step_loss.item()
        term_sums += out.term_sums.cpu()
        nll_sums += 0 if out.nll_sums is None else out.nll_sums.cpu()
        kept += out.n_kept
        low, high = min(low, out.weight_range[0]), max(high, out.weight_range[1])
    params = [p for p in parts.student.parameters() if p.grad is not None]
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # Schedules (TAID's t, DTS) read these: reduced over ranks so that every rank follows the same trajectory.
    term_means = [v / max(count, 1) for v in rt.all_reduce_sum(term_sums).tolist()]
    nll_means = tuple(v / max(count, 1) for v in rt.all_reduce_sum(nll_sums).tolist())
    stats = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": count, **term_metrics(objective, term_means)}
    if objective.selection is not None:  # local kept fraction (per rank): what the selector did this step
        stats["select/kept_fraction"] = kept / max(sum(int((shifted(b) != -100).sum()) for b in batches), 1)
        stats["select/weight_min"], stats["select/weight_max"] = low, high
    if objective.tracks_nll:
        stats["student_nll"], stats["teacher_nll"] = nll_means
    return stats, term_means, nll_means


def term_metrics(objective: Objective, term_means: list[float]) -> dict[str, float]:
    """Per-term token means as 'term/<name>' (a repeated name gets '#<index>'), plus schedule values."""
    names = [t.name for t in objective.terms]
    keys = [f"term/{n}" if names.count(n) == 1 else f"term/{n}#{i}" for i, n in enumerate(names)]
    return {**dict(zip(keys, term_means)), **objective.scalars()}


def run_eval(parts: Parts, held, cfg: RunConfig, step: int) -> dict:
    result = evaluate(parts.student, held, teacher=parts.teacher, vocab=parts.vocab, chunk_size=cfg.loss.chunk_size)
    sample = generate_sample(parts.student, parts.tokenizer, cfg.eval.sample_prompt, cfg.eval.max_new_tokens, seed=cfg.train.seed)
    return {"step": step, "kind": "eval", **result.metrics, "calibration": result.calibration, "sample": sample}


def append_metrics(run_dir: Path, row: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def distill(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Run one distillation as configured; returns the run directory, the final student dir and last metrics."""
    rt = runtime.setup(cfg.device)
    objective = cfg.objective()
    run_dir = prepare_run_dir(cfg.out_dir, resume, overwrite)
    runtime.seed_everything(cfg.train.seed)
    parts = load_parts(cfg, rt.device)
    train_examples, held_examples = load_examples(cfg, parts.tokenizer)
    if parts.cache is not None:
        check_examples_cached(parts.cache, train_examples)
    pad = parts.tokenizer.pad_token_id
    batcher = Batcher(train_examples, cfg.train.batch_size, cfg.train.seed, pad)
    held = [to_device(b, rt.device) for b in eval_batches(held_examples, cfg.eval.batch_size, pad)]
    optimizer, scheduler = make_optimizer(cfg, parts.student)
    config_yaml = cfg.to_yaml()
    atomic_write_text(run_dir / "config.yaml", config_yaml)
    step = restore(run_dir, parts, optimizer, scheduler, batcher, objective) if resume else 0
    last_eval: dict = {}
    with TrainProgress(cfg.train.max_steps, step, enabled=progress and rt.is_main) as bar:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            micro = [to_device(batcher.next_batch(), rt.device) for _ in range(cfg.train.grad_accum)]
            stats, term_means, nll_means = train_step(parts, micro, objective, cfg, rt, optimizer, scheduler)
            step += 1
            objective.after_step(term_means, step, cfg.train.max_steps, nll_means)
            stats["tokens_per_s"] = stats["tokens"] / (time.perf_counter() - started)
            bar.update(step, stats["loss"], stats["tokens_per_s"])
            if rt.is_main and (step % cfg.train.log_every == 0 or step == cfg.train.max_steps):
                append_metrics(run_dir, {"step": step, "kind": "train", **stats})
            if _due(step, cfg.train.eval_every, cfg.train.max_steps):
                last_eval = run_eval(parts, held, cfg, step)
                append_metrics(run_dir, last_eval)
                bar.note(f"step {step}: held-out CE {last_eval['student_ce']:.4f}")
            if _due(step, cfg.train.save_every, cfg.train.max_steps):
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "rng": runtime.rng_state(), "data": batcher.state(), "objective": objective.state_dict()}
                checkpoint.save_checkpoint(run_dir, step, parts.student, parts.tokenizer, config_yaml, state, cfg.train.keep_checkpoints)
    final = checkpoint.save_model_dir(run_dir / "final", parts.student, parts.tokenizer, {"config.yaml": config_yaml})
    if not last_eval:  # resumed at max_steps: keep the metrics the run already has
        last_eval = run_eval(parts, held, cfg, step)
        append_metrics(run_dir, last_eval)
    write_report(run_dir)
    return RunResult(run_dir, final, {k: v for k, v in last_eval.items() if isinstance(v, (int, float))})


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def restore(run_dir: Path, parts: Parts, optimizer, scheduler, batcher: Batcher, objective: Objective) -> int:
    """Load the newest complete checkpoint into the freshly built run; returns the step to continue from."""
    path = checkpoint.latest_checkpoint(run_dir)
    state = checkpoint.load_trainer_state(path)
    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(parts.student.parameters()).dtype)
    parts.student.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batcher.load_state(state["data"])
    objective.load_state_dict(state["objective"])
    runtime.set_rng_state(state["rng"])
    checkpoint.truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    return int(state["step"])
