"""Training progress on stderr: step, loss, tokens/s and ETA. A rich bar on a terminal; plain lines every ``every``
steps (and at the last step) when stderr is a file or a pipe (a batch job's log), where a live bar would only show
up once, at the end. Disabled off the main rank or on request."""
from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, every: int = 10, console: Console | None = None):
        self.enabled, self.total, self.start, self.every = enabled, total, start, max(1, every)
        self.console = console or Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]distil"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.live, transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)

    def __enter__(self) -> "TrainProgress":
        self.progress.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, tps=tokens_per_s)
        if self.enabled and not self.live and (step % self.every == 0 or step == self.total):
            self.console.print(self.line(step, loss, tokens_per_s), highlight=False, soft_wrap=True)

    def line(self, step: int, loss: float, tokens_per_s: float) -> str:
        """e.g. 'step 20/300  loss 3.4512  1,234 tok/s  ETA 0:01:10' (ETA from this session's steps so far)."""
        done = step - self.start
        eta = (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else float("nan")
        eta_text = str(timedelta(seconds=round(eta))) if eta == eta else "?"
        return f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  ETA {eta_text}"

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)
