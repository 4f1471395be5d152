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
