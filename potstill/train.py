"""The one training loop: batch → teacher signal → fused loss → step → eval → checkpoint.

Every regime (live teacher, cache, server, other tokenizers, several teachers, on-policy) differs only in the batches
it builds and in the target ``teacher_signal.teacher_target`` builds; the loss path, normalisation, evaluation and
checkpointing are shared.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from potstill import checkpoint, lora, precision, runtime
from potstill.rundir import RunDirError, check_resume_config, check_run_dir, claim_run_dir  # noqa: F401 (re-export)
from potstill.assemble import Parts, load_examples, load_parts, teacher_held_out
from potstill.config import RunConfig
from potstill.data.batches import Batcher
from potstill.evaluate import evaluate, generate_sample
from potstill.io import atomic_write_text
from potstill.labels import IGNORE_INDEX
from potstill.losses.chunked import LossOutput, fused_loss, should_compile
from potstill.losses.objective import Objective
from potstill.losses.reduce import count_valid_tokens, normalise
from potstill.monitor import EarlyStop, HeldOut, held_out
from potstill.progress import TrainProgress
from potstill.report import write_report
from potstill.trackers import Trackers
from potstill.cache.opening import check_examples_cached
from potstill.importance import SAMPLER_LOGPROBS
from potstill.data.packing import padding_fraction
from potstill.packing_check import check_parts_for_packing
from potstill.onpolicy import regime as regimes
from potstill.hidden import kd as hidden_kd
from potstill.encoders import loop as encoder_loop
from potstill.teacher_signal import frozen_signal, teacher_target  # noqa: F401 (re-export)


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    metrics: dict = field(default_factory=dict)  # the last evaluation's metrics


MAX_CONSECUTIVE_SKIPS = 10  # train.on_nonfinite=skip stops a run that is broken for good rather than spin


class NonFiniteError(RuntimeError):
    """A step's loss, one of its terms or its gradient norm was NaN or infinite; the model was not updated."""


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    """LR multiplier at ``step`` (0-based, counting optimizer updates). After warm-up this is exactly transformers'
    get_{cosine,linear,constant}_schedule_with_warmup; in warm-up it is one step ahead ((s+1)/w, not s/w), so the
    first update is not taken at lr 0 and the shipped teacher's recipe and the quickstart stay reproducible."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def make_optimizer(cfg: RunConfig, model) -> tuple[torch.optim.Optimizer, LambdaLR]:
    t = cfg.train
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay)
    warmup = t.resolved_warmup()
    sched = LambdaLR(opt, lambda s: lr_lambda(s, warmup, t.max_steps, t.schedule))
    return opt, sched


def shifted(batch: dict) -> torch.Tensor:
    """Labels (B, T-1) for the predictions at positions 0..T-2: position t predicts token t+1."""
    return batch["labels"][:, 1:]


def shifted_sampler_logprobs(batch: dict) -> torch.Tensor | None:
    """The sampling policy's log-prob of each label (B, T-1), aligned like ``shifted`` (rollout batches carry
    ``sampler_logprobs`` (B, T) aligned with labels); None for batches not sampled by a rollout."""
    return batch[SAMPLER_LOGPROBS][:, 1:] if SAMPLER_LOGPROBS in batch else None


def batch_loss(parts: Parts, par: runtime.Parallel, batch: dict, objective: Objective, chunk_size: int,
               compiled: bool = False, amp: precision.Amp = precision.FULL) -> LossOutput:
    """The student's forward goes through ``par.student`` (the seam, wrapped in DDP/FSDP2 on several ranks); the
    head's gradient flows back through the fused loss's autograd Function. The student and its loss run under
    autocast; frozen models run in their own dtype."""
    if encoder_loop.is_embedding_run(parts):  # pooled embeddings: cosine / mse / relation terms, sums over texts
        return encoder_loop.batch_loss(par, batch, objective, amp)
    with amp.autocast():
        h, weight, bias, *extra = par.student(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    h = h[:, :-1]
    target = teacher_target(parts, par, batch, objective)
    reference = frozen_signal(par.reference, batch) if par.reference is not None else None
    with amp.autocast():
        out = fused_loss(h, weight, bias, shifted(batch), objective, target, chunk_size=chunk_size,
                         reference=reference, compiled=compiled, sampler_logp=shifted_sampler_logprobs(batch))
    return hidden_kd.add_terms(parts.hidden, out, extra, target, batch)  # hidden.*: same sum, same normalisation


def train_step(parts, par, batches, objective, cfg, rt, optimizer, scheduler,
               amp: precision.Amp = precision.FULL) -> tuple[dict, list[float], tuple]:
    """One optimiser step over ``grad_accum`` micro-batches, normalised by the step's global token count; gradients
    are summed over ranks on the last micro-batch only (``par.micro_batch``)."""
    count = count_valid_tokens([shifted(b) for b in batches], rt.all_reduce_sum)
    term_sums, nll_sums = torch.zeros(len(objective.terms)), torch.zeros(2)
    loss, kept, low, high = 0.0, 0, float("inf"), float("-inf")
    compiled = should_compile(cfg.loss.compile, objective, rt.device, parts.vocab)
    for i, batch in enumerate(batches):
        with par.micro_batch(last=i == len(batches) - 1):
            out = batch_loss(parts, par, batch, objective, cfg.loss.chunk_size, compiled, amp)
            step_loss = normalise(out.total, count)
            amp.backward(step_loss)
        loss += step_loss.item()
        term_sums += out.term_sums.cpu()
        nll_sums += 0 if out.nll_sums is None else out.nll_sums.cpu()
        kept += out.n_kept
        low, high = min(low, out.weight_range[0]), max(high, out.weight_range[1])
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
    amp.unscale(optimizer)  # fp16: clip true gradients
    grad_norm = par.clip_grad_norm(max_norm)
    loss = rt.all_reduce_sum(torch.tensor(loss, dtype=torch.float64)).item()  # each rank's part of the global mean
    # Schedules (TAID's t, DTS) read these: reduced over ranks so that every rank follows the same trajectory.
    term_means = [v / max(count, 1) for v in rt.all_reduce_sum(term_sums).tolist()]
    nll_means = tuple(v / max(count, 1) for v in rt.all_reduce_sum(nll_sums).tolist())
    stats = {"loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens": count,
             "padding": padding_fraction(batches),
             **term_metrics(objective, term_means),
             **(parts.hidden.step_metrics(rt.all_reduce_sum, count) if parts.hidden is not None else {})}
    problems = nonfinite_problems(objective, loss, term_means, amp.guarded_grad_norm(grad_norm))
    if problems:  # never reaches the optimizer; the loop decides (train.on_nonfinite) whether the run goes on
        optimizer.zero_grad(set_to_none=True)
        amp.abandon()
        return {**stats, "nonfinite": problems}, term_means, nll_means
    if amp.step(optimizer):  # False: the fp16 grad scaler skipped AdamW (inf/NaN gradient); the LR follows updates
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    stats.update(amp.stats())
    if objective.selection is not None:  # local kept fraction (per rank): what the selector did this step
        stats["select/kept_fraction"] = kept / max(sum(int((shifted(b) != IGNORE_INDEX).sum()) for b in batches), 1)
        stats["select/weight_min"], stats["select/weight_max"] = low, high
    if objective.tracks_nll:
        stats["student_nll"], stats["teacher_nll"] = nll_means
    return stats, term_means, nll_means


def term_names(objective: Objective) -> list[str]:
    """Each term's name; a name used twice gets '#<index>'."""
    names = [t.name for t in objective.terms]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def term_metrics(objective: Objective, term_means: list[float]) -> dict[str, float]:
    """Per-term token means as 'term/<name>', plus schedule values."""
    return {**{f"term/{n}": v for n, v in zip(term_names(objective), term_means)}, **objective.scalars()}


def nonfinite_problems(objective: Objective, loss: float, term_means: list[float], grad_norm: float) -> list[str]:
    """What was NaN/inf in a step, e.g. ["term 'rkl' is nan"]; empty when the step may update the model."""
    problems = [f"term '{n}' is {v}" for n, v in zip(term_names(objective), term_means) if not math.isfinite(v)]
    if not problems and not math.isfinite(loss):
        problems.append(f"the loss is {loss}")
    if not problems and not math.isfinite(grad_norm):
        problems.append(f"the gradient norm is {grad_norm}")
    return problems


def nonfinite_error(run_dir: Path, step: int, stats: dict, consecutive: int) -> NonFiniteError:
    """The one-line message for a run stopped by a non-finite step (train.on_nonfinite=stop, or too many skips)."""
    last = checkpoint.latest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    what = f"step {step}: {', '.join(stats['nonfinite'])} (loss {stats['loss']:.6g}, grad norm {stats['grad_norm']:.6g})"
    if consecutive > 1:
        return NonFiniteError(f"{what}, the {consecutive}th non-finite step in a row (train.on_nonfinite=skip gives up "
                              f"after {MAX_CONSECUTIVE_SKIPS}); {kept} — lower train.lr or check the data")
    return NonFiniteError(f"{what}; {kept} — lower train.lr, raise train.warmup_steps or check the step's data, "
                          "or set train.on_nonfinite=skip to drop such steps")


def run_eval(parts: Parts, held: HeldOut, cfg: RunConfig, step: int) -> dict:
    if encoder_loop.is_encoder_run(parts):  # accuracy / agreement / KL, or embedding agreement (encoders/evaluation.py)
        return encoder_loop.run_eval(parts, held.batches, step)
    teacher = None if parts.crosstok is not None else parts.teacher  # another tokenizer: no per-token comparison
    result = evaluate(parts.student, held.batches, teacher=teacher, vocab=parts.vocab,
                      chunk_size=cfg.loss.chunk_size, golden=held.golden)
    if held.teacher_batches:  # a live teacher across tokenizers, on its own tokens of the same text: teacher_bpb
        result.metrics |= held.teacher_own_metrics(parts.teacher, parts.crosstok.teacher.seam.vocab, cfg.loss.chunk_size)
    tasks = held.task_metrics(parts.student, parts.tokenizer, cfg.eval.batch_size)
    if parts.teachers is not None:  # per-teacher weights; teachers.mix=ddk re-weighs from held-out CE here
        tasks.update(parts.teachers.after_eval(parts.student, held.batches))
    sample = generate_sample(parts.student, parts.tokenizer, cfg.eval.sample_prompt, cfg.eval.max_new_tokens, seed=cfg.train.seed)
    return {"step": step, "kind": "eval", **result.metrics, **tasks, "calibration": result.calibration, "sample": sample}


def append_metrics(run_dir: Path, row: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def distill(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Run one distillation as configured; returns the run directory, the final student dir and last metrics.

    The run directory is checked first (read only) and created or replaced only after every input is validated
    and the models are loaded, so a refused run leaves nothing behind."""
    rt = runtime.setup(cfg.device)
    objective = cfg.objective()
    run_dir = Path(cfg.out_dir)
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        check_resume_config(run_dir, cfg, rt.world_size)
    runtime.seed_everything(cfg.train.seed)
    parts = load_parts(cfg, rt.device)
    # before parallelize: gradient checkpointing is set on the HF model, which FSDP2 then wraps
    amp = precision.setup(cfg, rt.device, parts.student, checkpoint.latest_checkpoint(run_dir) if resume else None)
    par = runtime.parallelize(rt, parts.student, (parts.teacher, parts.reference), parts.vocab, cfg.parallel.strategy,
                              cfg.parallel.teacher, parts.hidden.make_seam if parts.hidden is not None else None)
    runtime.seed_ranks(rt, cfg.train.seed)
    train_examples, held_examples = load_examples(cfg, parts.tokenizer, annotate=getattr(parts.crosstok, "aligner", None))
    if parts.cache is not None:
        check_examples_cached(parts.cache, train_examples)
    if parts.teachers is not None:
        parts.teachers.bind(train_examples, held_examples)
    if parts.crosstok is not None:  # a cached teacher across tokenizers: its tokens against the alignment
        parts.crosstok.check_examples(train_examples)
    pad = parts.tokenizer.pad_token_id
    if cfg.data.packing:
        check_parts_for_packing(parts)
    batcher = Batcher(train_examples, cfg.train.batch_size, cfg.train.seed, pad, cfg.data.max_length if cfg.data.packing else 0,
                      rank=rt.rank, world_size=rt.world_size)
    held = held_out(cfg, parts.tokenizer, held_examples, parts.vocab, rt.device, *teacher_held_out(cfg, parts, held_examples))
    # after parallelize (FSDP2 made the params DTensors), from the seam: it also holds hidden-state projections
    optimizer, scheduler = make_optimizer(cfg, par.student)
    regime = regimes.build(cfg, rt, parts, par, amp, train_examples)  # data.regime, teacher.self_distill
    config_yaml = cfg.to_yaml()
    rt.barrier()  # every rank has checked the directory and loaded everything before rank 0 claims it
    if rt.is_main:
        claim_run_dir(run_dir, resume, overwrite)
        atomic_write_text(run_dir / "config.yaml", config_yaml)
    rt.barrier()
    loop = Loop(cfg, rt, parts, objective, optimizer, scheduler, batcher, run_dir, config_yaml, par, regime, amp,
                early_stop=EarlyStop.from_config(cfg))
    if resume:
        loop.restore()
    loop.trackers = Trackers.start(cfg.train.report_to, run_dir, cfg.to_dict(), loop.step if resume else None, rt.is_main)
    try:
        last_eval = loop.run(held, progress and rt.is_main)
        final = run_dir / "final"
        student_state = par.model_state()
        if rt.is_main:
            checkpoint.save_model_dir(final, lora.final_form(parts.student, cfg.student.lora), parts.tokenizer,
                                      {"config.yaml": config_yaml, **hidden_kd.final_files(parts.hidden),
                                       **encoder_loop.final_files(parts)}, student_state)
        if not last_eval:  # resumed at max_steps: keep the metrics the run already has
            with par.gathered():  # every rank evaluates (FSDP needs all ranks in each forward); rank 0 writes
                last_eval = run_eval(parts, held, cfg, loop.step)
            if rt.is_main:
                loop.record(last_eval)
    finally:
        loop.trackers.finish()
    if rt.is_main:
        write_report(run_dir)
    rt.barrier()
    return RunResult(run_dir, final, {k: v for k, v in last_eval.items() if isinstance(v, (int, float))})


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


@dataclass
class Loop:
    """The step loop and the state a checkpoint holds (step, skipped-step count, optimizer, schedules, data, RNG)."""

    cfg: RunConfig
    rt: runtime.Runtime
    parts: Parts
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    batcher: Batcher
    run_dir: Path
    config_yaml: str
    par: runtime.Parallel
    regime: regimes.Regime  # what the steps train on: data, rollouts, privileged views (onpolicy/)
    amp: precision.Amp = precision.FULL  # autocast and fp16 grad scaler (precision.py)
    step: int = 0
    skipped: int = 0  # steps dropped by train.on_nonfinite=skip over the whole run
    consecutive: int = 0  # ... in a row, up to now
    trackers: Trackers = field(default_factory=Trackers)  # train.report_to
    early_stop: EarlyStop = field(default_factory=lambda: EarlyStop(None))  # eval.early_stop (monitor.py)

    def record(self, row: dict) -> None:
        """One metrics row: to metrics.jsonl and to the trackers."""
        append_metrics(self.run_dir, row)
        self.trackers.log(row)

    def run(self, held: HeldOut, progress: bool) -> dict:
        """Train up to max_steps; returns the last evaluation's record ({} when no step was left to take)."""
        cfg, parts = self.cfg, self.parts
        # from_pretrained returns eval-mode models: dropout must be on for training steps, off for frozen models.
        parts.student.train()
        for frozen in (parts.teacher, parts.reference):
            if frozen is not None:
                frozen.eval()
        last_eval: dict = {}
        with TrainProgress(cfg.train.max_steps, self.step, enabled=progress, every=cfg.train.log_every) as bar:
            while self.step < cfg.train.max_steps and not self.early_stop.stopped:
                stats = self.one_step()
                bar.update(self.step, stats["loss"], stats["tokens_per_s"])
                if "nonfinite" in stats:
                    bar.note(f"step {self.step}: skipped ({', '.join(stats['nonfinite'])})")
                if _due(self.step, cfg.train.eval_every, cfg.train.max_steps):
                    with self.par.gathered():  # every rank evaluates (FSDP: all ranks in each forward)
                        last_eval = run_eval(parts, held, cfg, self.step)
                    self.regime.after_eval(last_eval)
                    if self.rt.is_main:
                        self.record(last_eval)
                    bar.note(f"step {self.step}: {encoder_loop.headline(last_eval)}")
                    if self.early_stop.update(last_eval, self.step) and self.rt.is_main:
                        self.record(self.early_stop.record(self.step))
                if self.early_stop.stopped or _due(self.step, cfg.train.save_every, cfg.train.max_steps):
                    self.save()
        return last_eval

    def one_step(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        micro = [to_device(self.batcher.next_batch(), self.rt.device) for _ in range(cfg.train.grad_accum)]
        micro = self.regime.prepare(self.step, micro)
        stats, term_means, nll_means = train_step(self.parts, self.par, micro, self.objective, cfg, self.rt,
                                                  self.optimizer, self.scheduler, self.amp)
        self.step += 1
        seconds = time.perf_counter() - started
        stats["tokens_per_s"] = stats["tokens"] / seconds
        stats.update(self.regime.metrics(seconds))
        if "nonfinite" in stats:
            self.skip(stats)
        else:
            self.consecutive = 0
            self.regime.after_step()
            self.objective.after_step(term_means, self.step, cfg.train.max_steps, nll_means)
            if self.rt.is_main and (self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps):
                self.record({"step": self.step, "kind": "train", **stats, "skipped": self.skipped})
        return stats

    def skip(self, stats: dict) -> None:
        """A non-finite step (the model was not updated): stop, or log it and go on (train.on_nonfinite)."""
        self.consecutive += 1
        if self.cfg.train.on_nonfinite == "stop" or self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise nonfinite_error(self.run_dir, self.step, stats, self.consecutive)
        self.skipped += 1
        if self.rt.is_main:
            self.record({"step": self.step, "kind": "skip", "reason": ", ".join(stats["nonfinite"]),
                         "skipped": self.skipped})

    def save(self) -> None:
        """Full (unsharded) model and optimizer states and every rank's RNG state, written by rank 0 only."""
        optimizer_state, model_state = self.par.optimizer_state(self.optimizer), self.par.model_state()
        state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "rng": runtime.rank_rng_states(self.rt), "data": self.batcher.state(),
                 "objective": self.objective.state_dict(), "skipped": self.skipped, "consecutive": self.consecutive,
                 "world_size": self.rt.world_size, "amp": self.amp.state_dict(), "onpolicy": self.regime.state_dict(),
                 "early_stop": self.early_stop.state_dict(), "hidden": hidden_kd.state_dict(self.parts.hidden),
                 "teachers": self.parts.teachers.state_dict() if self.parts.teachers is not None else None}
        if self.rt.is_main:
            checkpoint.save_checkpoint(self.run_dir, self.step, self.parts.student, self.parts.tokenizer,
                                       self.config_yaml, state, self.cfg.train.keep_checkpoints, model_state)
        self.rt.barrier()

    def restore(self) -> None:
        """Load the newest complete checkpoint into the freshly built run and continue from its step."""
        path = checkpoint.latest_checkpoint(self.run_dir)
        state = checkpoint.load_trainer_state(path)
        self.par.load(checkpoint.saved_student_state(path, self.parts.student), self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batcher.load_state(state["data"])
        self.objective.load_state_dict(state["objective"])
        self.amp.load_state_dict(state.get("amp"))
        self.regime.load_state_dict(state.get("onpolicy"))
        self.early_stop.load_state_dict(state.get("early_stop"))
        if self.parts.teachers is not None:
            self.parts.teachers.load_state_dict(state.get("teachers"))
        hidden_kd.load_state_dict(self.parts.hidden, state.get("hidden"))
        runtime.restore_rank_rng(self.rt, state["rng"], self.cfg.train.seed, int(state["step"]))
        if self.rt.is_main:
            checkpoint.truncate_metrics(self.run_dir / "metrics.jsonl", state["step"])
        self.rt.barrier()
        self.step, self.skipped, self.consecutive = int(state["step"]), state.get("skipped", 0), state.get("consecutive", 0)
