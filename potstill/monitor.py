"""What an evaluation measures beyond the token metrics, and the golden early stop.

``HeldOut`` is the held-out side of a run, built once: the padded batches, the golden table when the held-out data
is the built-in validation split (``golden.py``), and the checkable task prompts when the held-out records carry
an ``answer`` (``task_eval.py``). ``EarlyStop`` (``eval.early_stop=golden``) ends a run once golden_kl_student has
not improved for ``eval.patience`` evaluations in a row; the run then ends like one at max_steps (checkpoint,
final/ = the model at the stopping step, report), and its state is checkpointed so a resumed run knows it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from potstill.data.batches import eval_batches
from potstill.data.encode import Example
from potstill.evaluate import evaluate_on_own_tokens
from potstill.golden import GoldenTable, golden_for_run, held_out_is_builtin_text
from potstill.task_eval import TaskPrompt, task_metrics, task_prompts

EARLY_STOP = {"none": None, "golden": "golden_kl_student"}  # eval.early_stop -> the metric it watches (lower = better)


@dataclass
class HeldOut:
    batches: list[dict]
    golden: GoldenTable | None = None
    tasks: list[TaskPrompt] = field(default_factory=list)
    max_new_tokens: int = 0  # for the task generations; 0 = auto per task (task_eval.auto_max_new_tokens)
    # a cross-tokenizer run: the held-out text in the teacher's own tokens (assemble.teacher_held_out), and the
    # teacher's metrics on them (teacher_ce, teacher_bpb: computed once, the teacher is frozen)
    teacher_batches: list[dict] = field(default_factory=list)
    teacher_metrics: dict | None = None

    def teacher_own_metrics(self, teacher: nn.Module, vocab: int, chunk_size: int) -> dict:
        """The teacher on its own tokenisation of the held-out text ({} unless ``teacher_batches``)."""
        if self.teacher_batches and self.teacher_metrics is None:
            self.teacher_metrics = evaluate_on_own_tokens(teacher, self.teacher_batches, vocab=vocab, chunk_size=chunk_size)
        return self.teacher_metrics or {}

    def task_metrics(self, model: nn.Module, tokenizer, batch_size: int) -> dict:
        return task_metrics(model, tokenizer, self.tasks, self.max_new_tokens, batch_size) if self.tasks else {}


def device_batches(examples: list[Example], batch_size: int, pad_id: int, device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in eval_batches(examples, batch_size, pad_id)]


def held_out(cfg, tokenizer, examples: list[Example], vocab: int, device: torch.device,
             teacher_examples: list[Example] = (), teacher_pad_id: int = 0) -> HeldOut:
    """Batches on ``device``, the golden table and the task prompts of a run's held-out examples;
    ``teacher_examples``: the same held-out text in a cross-tokenizer teacher's own tokens (its pad id beside)."""
    batches = device_batches(examples, cfg.eval.batch_size, tokenizer.pad_token_id, device)
    golden = golden_for_run(cfg.data.train, cfg.data.validation, tokenizer, examples, vocab, device)
    if cfg.eval.early_stop == "golden" and golden is None:
        raise ValueError("eval.early_stop=golden needs golden metrics, and this tokenizer does not give exact built-in "
                         "token log-probs (use the built-in tokenizer, e.g. teacher.path=builtin)")
    tasks = task_prompts(examples, cfg.eval.max_task_examples) if cfg.eval.max_task_examples > 0 else []
    own = device_batches(teacher_examples, cfg.eval.batch_size, teacher_pad_id, device) if teacher_examples else []
    return HeldOut(batches, golden, tasks, cfg.eval.task_max_new_tokens, own)


def check_settings(cfg) -> None:
    """The eval.* keys this module reads, checked at config load."""
    e = cfg.eval
    if e.early_stop not in EARLY_STOP:
        raise ValueError(f"eval.early_stop={e.early_stop!r}: use {' or '.join(EARLY_STOP)}")
    if e.early_stop == "golden" and not held_out_is_builtin_text(cfg.data.train, cfg.data.validation):
        raise ValueError("eval.early_stop=golden needs golden metrics: the held-out data must be the built-in "
                         "validation split (data.validation=builtin, or data.train=builtin)")
    for name, value in (("eval.patience", e.patience), ("eval.max_task_examples", e.max_task_examples),
                        ("eval.task_max_new_tokens", e.task_max_new_tokens)):
        if value < 0 or (name == "eval.patience" and value == 0):
            raise ValueError(f"{name} must be {'≥ 1' if name == 'eval.patience' else '≥ 0'}, got {value}")


@dataclass
class EarlyStop:
    metric: str | None  # None: never stops
    patience: int = 1
    best: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    stopped: bool = False

    @classmethod
    def from_config(cls, cfg) -> "EarlyStop":
        return cls(EARLY_STOP[cfg.eval.early_stop], cfg.eval.patience)

    def update(self, metrics: dict, step: int) -> bool:
        """Take one evaluation; True when the run must stop now."""
        if self.metric is None:
            return False
        value = metrics.get(self.metric)
        if value is None:
            raise ValueError(f"eval.early_stop watches {self.metric}, which this evaluation did not log")
        if value < self.best:
            self.best, self.best_step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        self.stopped = self.evals_without_improvement >= self.patience
        return self.stopped

    def record(self, step: int) -> dict:
        """The metrics row a stop writes."""
        return {"step": step, "kind": "early_stop", "metric": self.metric, "best": self.best,
                "best_step": self.best_step, "patience": self.patience}

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement, "stopped": self.stopped}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step = float(state["best"]), int(state["best_step"])
            self.evals_without_improvement, self.stopped = int(state["evals_without_improvement"]), bool(state["stopped"])
