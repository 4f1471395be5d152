"""Timing shared by every side of `benchmarks/onpolicy.py` (imports neither potstill nor TRL, so both
environments load it): step ends, rollout and teacher time, generated tokens, one JSON summary line.

Every side is timed the same way (wall clock, and the process's CPU time beside it): a step is the interval between two consecutive step ends (data, rollout,
teacher, loss, backward, optimizer, bookkeeping: everything the trainer does per step); the first `warmup` steps
are dropped. Rollout time is the wall time inside the side's generation call; teacher time the wall time inside
the teacher's decoder body (a forward pre-hook and hook on it), both summed over the timed steps only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from torch import nn

RESULT_PREFIX = "ONPOLICY_RESULT "  # the line the parent reads from a child's stdout


@dataclass
class StepClock:
    warmup: int
    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)  # process CPU time: less inflated by other jobs' load
    rollout_s: list[float] = field(default_factory=list)  # per step (index = step - 1)
    teacher_s: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    _rollout: float = 0.0
    _teacher: float = 0.0
    _tokens: int = 0
    prompt_widths: set = field(default_factory=set)  # prompt tokens per rollout row (the batch's padded width)
    _teacher_started: float = 0.0

    def step_ended(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.rollout_s.append(self._rollout)
        self.teacher_s.append(self._teacher)
        self.new_tokens.append(self._tokens)
        self._rollout = self._teacher = 0.0
        self._tokens = 0

    def add_rollout(self, seconds: float, new_tokens: int, prompt_width: int) -> None:
        self.prompt_widths.add(prompt_width)
        self._rollout += seconds
        self._tokens += new_tokens

    def watch_teacher(self, body: nn.Module) -> None:
        """Time every forward of the teacher's decoder body (all sides call it, whatever calls the head)."""
        def started(*_):
            self._teacher_started = time.perf_counter()

        def ended(*_):
            self._teacher += time.perf_counter() - self._teacher_started

        body.register_forward_pre_hook(started)
        body.register_forward_hook(ended)

    def summary(self, **extra) -> dict:
        """Steps/s and generated tokens/s over the timed steps (those after the warm-up), and the time shares."""
        if not 1 <= self.warmup < len(self.ends):
            raise RuntimeError(f"{len(self.ends)} steps ended; need 1 ≤ warmup ({self.warmup}) < steps")
        timed = slice(self.warmup, None)  # step k (0-based) lasts ends[k] - ends[k-1], so step 0 is never timed
        seconds = self.ends[-1] - self.ends[self.warmup - 1]
        steps = len(self.ends) - self.warmup
        tokens = sum(self.new_tokens[timed])
        cpu_seconds = self.cpu_ends[-1] - self.cpu_ends[self.warmup - 1]
        return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds,
                "steps_per_cpu_s": steps / cpu_seconds,
                "new_tokens_per_step": sorted(set(self.new_tokens[timed])), "prompt_tokens": sorted(self.prompt_widths),
                "rollout_share": sum(self.rollout_s[timed]) / seconds,
                "teacher_share": sum(self.teacher_s[timed]) / seconds, **extra}


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)
