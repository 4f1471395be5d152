"""Objective state that changes during training: the TAID interpolation coefficient t (and, through the same
protocol, temperature schedules). A schedule provides the *dynamic* keyword arguments of a pure divergence
(``current()``), is updated once per optimiser step from that term's loss (``update``), and is saved in every
checkpoint (``state_dict``) so a resumed run continues the same trajectory."""
from __future__ import annotations

import math


class TaidSchedule:
    """TAID (Shing et al. 2025): t rises from t_start to t_end. Each step t moves to
    max(linear target by progress, t + α·σ(momentum)·(1 − t)), capped at t_end, where momentum is an EMA (β) of
    the loss' relative improvement: fast progress pushes t towards the teacher faster."""

    provides = ("t",)

    def __init__(self, t_start: float, t_end: float, alpha: float, beta: float):
        if t_start > t_end:
            raise ValueError(f"taid: t_start={t_start} must not exceed t_end={t_end}")
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t = t_start
        self.prev_loss: float | None = None
        self.momentum = 0.0

    def current(self) -> dict[str, float]:
        return {"t": self.t}

    def update(self, loss: float, step: int, total_steps: int) -> None:
        if self.prev_loss is not None:
            relative = (self.prev_loss - loss) / (abs(self.prev_loss) + 1e-15)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * relative
            target = self.t_start + (self.t_end - self.t_start) * step / max(total_steps, 1)
            adaptive = self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
            self.t = min(self.t_end, max(target, self.t + adaptive))
        self.prev_loss = loss

    def state_dict(self) -> dict:
        return {"t": self.t, "prev_loss": self.prev_loss, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.prev_loss, self.momentum = state["t"], state["prev_loss"], state["momentum"]


class DtsSchedule:
    """Dynamic Temperature Scheduler (Islam et al. 2025), as in the authors' reference code: the temperature
    follows a cosine decay from T0, boosted while the student's cross-entropy trails the teacher's by more than
    one nat, clamped to [t_min, t_max] and smoothed with momentum. Soft targets early, sharp ones late.

    Per step, with gap Δ = CE_teacher − CE_student (labelled tokens, T = 1; usually negative):
    c = ½(1 + cos(π·curve·step/total)); a = Δ/(Δ + 1) (> 1 only when Δ < −1; a > 2 is capped to 1.35 as in the
    authors' LLM code); target = clamp(T0·c·max(a, 1), t_min, t_max); T ← m·T + (1 − m)·target.
    Unlike the authors' per-batch update before the loss, T is updated after each optimiser step, like every
    schedule here, so that the value used by a step is a checkpointed state."""

    provides = ("temperature",)

    def __init__(self, t0: float, t_min: float, t_max: float, momentum: float, curve: float):
        if not t_min <= t_max:
            raise ValueError(f"dts: t_min={t_min} must not exceed t_max={t_max}")
        self.t0, self.t_min, self.t_max, self.momentum, self.curve = t0, t_min, t_max, momentum, curve
        self.temperature = min(max(t0, t_min), t_max)

    def current(self) -> dict[str, float]:
        return {"temperature": self.temperature}

    def update(self, gap: float, step: int, total_steps: int) -> None:
        cosine = 0.5 * (1 + math.cos(math.pi * self.curve * step / max(total_steps, 1)))
        boost = gap / (gap + 1) if gap != -1 else 1.0
        boost = 1.35 if boost > 2 else boost
        target = min(max(self.t0 * cosine * max(boost, 1.0), self.t_min), self.t_max)
        self.temperature = self.momentum * self.temperature + (1 - self.momentum) * target

    def state_dict(self) -> dict:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        self.temperature = state["temperature"]
