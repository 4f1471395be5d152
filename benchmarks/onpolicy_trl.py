"""TRL's side of `benchmarks/onpolicy.py`: one child process per trainer, run with the TRL environment's Python.

    /work/trlenv/bin/python benchmarks/onpolicy_trl.py {gkd|distillation} SETTINGS.json

GKDTrainer (`trl.experimental.gkd`, lmbda = 1: every step samples from the student) or DistillationTrainer
(`trl`, always on-policy) with the settings the parent wrote: the same saved teacher/student/tokenizer, the same
chat prompts, batch size, max new tokens, temperature, GJSD beta, learning rate, fp32, no gradient checkpointing
(both configs default it on, and GKD then generates without the KV cache), thread count and seed. EOS is held off
with `min_new_tokens = max_new_tokens` on the generation config, so every row generates exactly max_new_tokens.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy_clock import StepClock, emit  # noqa: E402

try:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
except ImportError as missing:
    sys.exit(f"error: {missing}; this script runs in the TRL environment (see benchmarks/onpolicy.py)")


class StepEnds(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_ended()


def timed_generate(model, clock: StepClock) -> None:
    """Wrap this student instance's `generate` (both trainers roll out through it) to time it and count the new
    tokens (each row up to and including its first EOS, as the trainers mask them)."""
    generate, eos = model.generate, model.generation_config.eos_token_id

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences[:, kwargs["input_ids"].shape[1]:]
        is_eos = new == eos
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new.shape[1])
        clock.add_rollout(time.perf_counter() - started, int(lengths.sum()), kwargs["input_ids"].shape[1])
        return out

    model.generate = wrapper


def common_args(s: dict) -> dict:
    return dict(output_dir=s["out_dir"], per_device_train_batch_size=s["batch_size"], max_steps=s["steps"],
                learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                temperature=s["temperature"], beta=s["beta"], bf16=False, fp16=False, use_cpu=True,
                gradient_checkpointing=False, logging_steps=10**6, save_strategy="no", report_to="none",
                disable_tqdm=True, seed=s["seed"], dataloader_num_workers=0)


def build_trainer(side: str, s: dict, student, teacher, tokenizer, records: list[dict]):
    if side == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common_args(s), lmbda=1.0, max_new_tokens=s["max_new_tokens"], max_length=None)
        data = Dataset.from_list([{"messages": r["messages"]} for r in records])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tokenizer)
        trainer.generation_config.min_new_tokens = s["max_new_tokens"]
        return trainer
    if side == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common_args(s), max_completion_length=s["max_new_tokens"],
                                  generation_kwargs={"min_new_tokens": s["max_new_tokens"]})
        data = Dataset.from_list([{"prompt": r["messages"][:1]} for r in records])
        return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                   processing_class=tokenizer)
    raise SystemExit(f"error: unknown TRL side {side!r}; expected gkd or distillation")


def main() -> None:
    side, settings_path = sys.argv[1], sys.argv[2]
    s = json.loads(Path(settings_path).read_text())
    torch.set_num_threads(s["threads"])
    tokenizer = AutoTokenizer.from_pretrained(s["teacher_dir"])
    tokenizer.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(s["student_dir"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(s["teacher_dir"], dtype=torch.float32)
    records = [json.loads(line) for line in Path(s["data"]).read_text().splitlines()]
    clock = StepClock(warmup=s["warmup"])
    trainer = build_trainer(side, s, student, teacher, tokenizer, records)
    timed_generate(trainer.model, clock)
    clock.watch_teacher(teacher.model)
    trainer.add_callback(StepEnds(clock))
    trainer.train()
    emit(clock.summary(side=f"TRL {trainer.__class__.__name__}", version=f"trl {trl.__version__}",
                       threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
