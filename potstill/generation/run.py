"""`potstill generate`: teacher completions for the prompts of data.train, written as training records.

Order of work: check the settings, read the prompts, set up the filters and the backend (a missing API key or
vLLM fails here), and only then open the output (``--overwrite`` deletes the old files at that point, so a
refused run leaves them alone), skip the (prompt_id, sample) pairs already written or rejected, and generate
the rest. Each result is filtered and appended at once; failures are counted, and the summary says what
happened (``Summary.metrics``).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from potstill.generation.filters import Completion, Filters
from potstill.generation.prompts import Prompt, load_prompts
from potstill.generation.store import Output
from potstill.sampling import SamplingSettings

log = logging.getLogger("potstill.generate")
BACKENDS = ("local", "openai", "vllm")
PROGRESS_EVERY_S = 10.0


@dataclass
class Summary:
    out: str
    kept: int = 0
    filtered: Counter = field(default_factory=Counter)
    failed: list[tuple[int, int]] = field(default_factory=list)
    already_done: int = 0  # pairs written or rejected by earlier runs
    tokens: int = 0  # generated tokens of this run's completions (kept or not), EOS included
    seconds: float = 0.0
    lines: int = 0  # kept completions in the file after this run

    def metrics(self) -> dict:
        return {"kept": self.kept, **{f"filtered ({r})": c for r, c in sorted(self.filtered.items())},
                "failed": len(self.failed), "done before": self.already_done, "tokens": self.tokens,
                "seconds": round(self.seconds, 2), "lines in file": self.lines}


def check_settings(cfg) -> None:
    g = cfg.generate
    if g.backend not in BACKENDS:
        raise ValueError(f"generate.backend={g.backend!r}: use one of {', '.join(BACKENDS)}")
    if g.backend in ("local", "vllm") and not cfg.teacher.path:
        raise ValueError(f"generate.backend={g.backend} needs teacher.path (--teacher): the model that writes the completions")
    SamplingSettings(g.max_new_tokens, g.temperature, g.top_p, g.n).check("generate")
    positive = {"batch_size": g.batch_size, "concurrency": g.concurrency, "timeout": g.timeout}
    for key, value in positive.items():
        if value <= 0:
            raise ValueError(f"generate.{key} must be > 0, got {value}")
    if g.max_retries < 0 or g.min_tokens < 0:
        raise ValueError("generate.max_retries and generate.min_tokens must be ≥ 0")
    if g.max_tokens is not None and g.max_tokens < g.min_tokens:
        raise ValueError(f"generate.max_tokens={g.max_tokens} is below generate.min_tokens={g.min_tokens}")


def content_settings(cfg) -> dict:
    """The settings that determine what the output holds (OUT.meta.json); a resume must keep them. Not included:
    where and how fast (out, base_url, concurrency, timeout, max_retries), the key's variable name, and how many
    prompts (data.max_train_examples may grow to extend a run)."""
    g = cfg.generate
    settings = {"backend": g.backend, "data.train": cfg.data.train, "n": g.n, "temperature": g.temperature,
                "top_p": g.top_p, "max_new_tokens": g.max_new_tokens, "seed": g.seed, "checker": g.checker,
                "dedup": g.dedup, "min_tokens": g.min_tokens, "max_tokens": g.max_tokens,
                "keep_unfinished": g.keep_unfinished}
    if g.backend == "openai":
        settings |= {"model": g.model, "endpoint": g.endpoint}
    else:
        settings |= {"model": cfg.teacher.path}
    if g.backend == "local":
        settings |= {"batch_size": g.batch_size, "teacher.dtype": cfg.teacher.dtype}
    return {f"generate.{k}" if "." not in k else k: v for k, v in settings.items()}


def make_backend(cfg, prompts: list[Prompt]):
    backend = cfg.generate.backend
    if backend == "openai":
        from potstill.generation.remote import OpenAIBackend

        return OpenAIBackend(cfg, prompts)
    from potstill.generation.local import LocalBackend, VllmBackend

    return LocalBackend(cfg, prompts) if backend == "local" else VllmBackend(cfg)


class Sink:
    """Where a backend's results go: filtered, appended to the output, counted."""

    def __init__(self, out: Output, filters: Filters, prompts: list[Prompt], summary: Summary, total: int,
                 as_chat: bool = False):
        self.out, self.filters, self.summary, self.total, self.as_chat = out, filters, summary, total, as_chat
        self.prompts = {p.prompt_id: p for p in prompts}
        self.last_report = time.monotonic()

    def result(self, completion: Completion) -> None:
        prompt = self.prompts[completion.prompt_id]
        self.summary.tokens += completion.tokens
        kept = self.out.progress.kept_texts.setdefault(prompt.prompt_id, set())
        reason = self.filters.reason(prompt, completion, kept)
        if reason is not None:
            self.reject(completion.prompt_id, completion.sample, reason)
            return
        self.out.keep(prompt.record(completion.text, completion.sample, self.as_chat))
        kept.add(completion.text)
        self.summary.kept += 1
        self._report()

    def reject(self, prompt_id: int, sample: int, reason: str) -> None:
        self.out.reject(prompt_id, sample, reason)
        self.summary.filtered[reason] += 1
        self._report()

    def failed(self, prompt_id: int, sample: int, message: str) -> None:
        log.warning("generate: prompt %d sample %d failed after the retries: %s", prompt_id, sample, message)
        self.summary.failed.append((prompt_id, sample))

    def _report(self) -> None:
        if time.monotonic() - self.last_report >= PROGRESS_EVERY_S:
            s = self.summary
            done = s.kept + sum(s.filtered.values()) + len(s.failed)
            log.info("generate: %d/%d done (%d kept, %d filtered, %d failed)", done, self.total, s.kept,
                     sum(s.filtered.values()), len(s.failed))
            self.last_report = time.monotonic()


def generate(cfg, overwrite: bool = False) -> Summary:
    """Generate, filter and append completions for every (prompt, sample) pair not done yet."""
    started = time.perf_counter()
    check_settings(cfg)
    g = cfg.generate
    prompts = load_prompts(cfg.data.train, cfg.data.max_train_examples)
    filters = Filters(g, prompts)
    backend = make_backend(cfg, prompts)
    summary = Summary(g.out)
    with Output(g.out, content_settings(cfg), overwrite) as out:
        pending = {(p.prompt_id, s) for p in prompts for s in range(g.n)} - out.progress.done
        summary.already_done = len(prompts) * g.n - len(pending)
        log.info("generate: %d prompts × %d samples, %d done before, %d to generate → %s", len(prompts), g.n,
                 summary.already_done, len(pending), out.path)
        if pending:
            as_chat = cfg.generate.backend == "openai" and cfg.generate.endpoint == "chat"  # replies to a chat turn
            backend.run(prompts, pending, Sink(out, filters, prompts, summary, len(pending), as_chat))
        summary.lines = out.progress.lines
    summary.seconds = time.perf_counter() - started
    return summary
