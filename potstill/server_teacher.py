"""A teacher behind an OpenAI-compatible completions endpoint that scores given tokens (vLLM, `potstill serve`).

Per batch, each row's real tokens go to ``POST {teacher.server_url}/v1/completions`` as a token-id prompt with
``max_tokens: 0, echo: true, logprobs: k, return_tokens_as_token_ids: true``; the echoed prompt log-probs become
the batch's teacher signal (a signal is data, like a cache lookup):

- ``teacher.server_top_k = 0``: the log-prob of each label token only → ``TokenLogprobs`` (serves ``opd``, ``ce``);
- ``teacher.server_top_k = k > 0``: the k most likely ids with their log-probs → ``TopKTail``, the tail mass
  1 − Σ exp(top-k) (serves every term but ``opd``, as a top-k cache does; support: the k returned ids).

The server scores at T = 1 with its own tokenizer applied to nothing: ids are sent as ids, and the echoed ids are
checked against them. The API key is read from the environment variable named by ``teacher.api_key_env`` and is
never written anywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.api_keys import api_key_from_env
from potstill.cache.targets import topk_padding  # the cache's filler for padded top-k positions
from potstill.losses.objective import Objective
from potstill.losses.targets import TokenLogprobs, TopKTail, tail_mass

# ``cfg`` arguments are RunConfigs; not imported: config.validate calls check_settings (no import cycle)
NO_KEY = "EMPTY"  # what the openai client sends when no key is configured (vLLM's convention for "no auth")


class ServerTeacherError(RuntimeError):
    """The teacher server failed or answered something the run cannot use (one line: URL and what to do)."""


def check_settings(cfg, objective: Objective) -> None:
    """Config-load checks for teacher.server_url: every refusal is one line naming the key."""
    t = cfg.teacher
    if not t.server_url:
        return
    if t.cache:
        raise ValueError("set one teacher signal: teacher.server_url or teacher.cache, not both")
    if t.self_distill != "none":
        raise ValueError(f"teacher.self_distill={t.self_distill} makes the student its own teacher: unset teacher.server_url")
    if not t.server_model:
        raise ValueError("teacher.server_url needs teacher.server_model (the model name the server serves)")
    if t.server_top_k < 0:
        raise ValueError(f"teacher.server_top_k must be ≥ 0 (0 = the label token's log-prob only), got {t.server_top_k}")
    if t.server_timeout <= 0:
        raise ValueError(f"teacher.server_timeout must be > 0 seconds, got {t.server_timeout}")
    if abs(cfg.loss.temperature - 1.0) > 1e-6 or cfg.loss.temperature_schedule not in (None, "fixed"):
        raise ValueError("a server teacher scores at T = 1: set loss.temperature=1 and no loss.temperature_schedule")
    if cfg.data.packing:
        raise ValueError("a server teacher scores each row as one text: data.packing (several documents per row) "
                         "is not supported with teacher.server_url")
    what = f"teacher.server_url with teacher.server_top_k={t.server_top_k}"
    if t.server_top_k == 0:
        objective.check_token_support(what)
        if objective.selection is not None:
            raise ValueError("loss.select needs the teacher's distribution: set teacher.server_top_k > 0")
    else:
        objective.check_label_logprobs(what)
    if t.api_key_env:
        api_key_from_env("teacher.api_key_env", t.api_key_env)


def _token_id(text: str, url: str) -> int:
    """'token_id:12' → 12 (the form `return_tokens_as_token_ids` gives)."""
    prefix, _, number = text.partition(":")
    if prefix != "token_id" or not number.lstrip("-").isdigit():
        raise ServerTeacherError(f"teacher server {url} returned token {text!r}, not 'token_id:N': it must support "
                                 "return_tokens_as_token_ids (vLLM, potstill serve)")
    return int(number)


@dataclass
class RowScores:
    """One row's echoed prompt: log p(token_j | tokens_<j) for j ≥ 1 (L − 1,), and with top-k the k best ids and
    their log-probs per scored position ((L − 1, k) each)."""

    token_logprobs: Tensor
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None


def parse_choice(logprobs: dict, sent: list[int], k: int, url: str) -> RowScores:
    """A completions choice's ``logprobs`` ({"tokens", "token_logprobs", "top_logprobs"}) for the prompt ``sent``,
    checked: the echo must be exactly the sent ids, every position after the first scored, and (k > 0) at least
    k alternatives per position."""
    echoed = [_token_id(t, url) for t in logprobs["tokens"]]
    if echoed != sent:
        raise ServerTeacherError(f"teacher server {url} echoed other tokens than it was sent ({len(echoed)} vs "
                                 f"{len(sent)} ids): it must score token-id prompts as given")
    values = logprobs["token_logprobs"][1:]
    if any(v is None for v in values):
        raise ServerTeacherError(f"teacher server {url} left prompt tokens unscored (token_logprobs null after the first)")
    scores = RowScores(torch.tensor(values, dtype=torch.float32))
    if k > 0:
        tops = [sorted(((_token_id(t, url), lp) for t, lp in (d or {}).items()), key=lambda e: -e[1])[:k]
                for d in logprobs["top_logprobs"][1:]]
        if any(len(top) < k for top in tops):
            raise ServerTeacherError(f"teacher server {url} returned fewer than teacher.server_top_k={k} top log-probs")
        scores.top_ids = torch.tensor([[i for i, _ in top] for top in tops], dtype=torch.long)
        scores.top_logprobs = torch.tensor([[lp for _, lp in top] for top in tops], dtype=torch.float32)
    return scores


def real_positions(batch: dict) -> list[Tensor]:
    """Per row, the positions of its real tokens (attention_mask = 1; every position without a mask)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return [row.nonzero().squeeze(-1).cpu() for row in mask]


def batch_signal(rows: list[RowScores], positions: list[Tensor], shape: tuple[int, int], k: int, vocab: int):
    """Row scores → the target over the batch's predicted positions (B·(T−1)): the log-prob of real token j is
    the signal of the position before it (position p predicts token p + 1); positions without a score (padding,
    a row's last token) hold a finite filler: 0 for label log-probs, the uniform k + 1 bins for top-k."""
    rows_n, width = shape
    predicted = torch.zeros(rows_n, width, dtype=torch.bool)
    logp = torch.zeros(rows_n, width)
    for b, (scores, pos) in enumerate(zip(rows, positions)):
        at = pos[1:] - 1
        predicted[b, at] = True
        logp[b, at] = scores.token_logprobs
    if k == 0:
        return TokenLogprobs(logp.reshape(-1), 1.0)
    pad_ids, pad_logprob, pad_tail = topk_padding(k)
    ids = pad_ids.expand(rows_n, width, k).clone()
    top = torch.full((rows_n, width, k), pad_logprob)
    for b, (scores, pos) in enumerate(zip(rows, positions)):
        ids[b, pos[1:] - 1], top[b, pos[1:] - 1] = scores.top_ids, scores.top_logprobs
    tail = torch.where(predicted, tail_mass(top), pad_tail)
    return TopKTail(ids.reshape(-1, k), top.reshape(-1, k), tail.reshape(-1), vocab, 1.0)


class ServerTeacher:
    """The client: one completions request per batch (all rows as token-id prompts), with the openai client's
    timeout and retries (exponential backoff on connection errors, 408/409/429 and 5xx)."""

    def __init__(self, url: str, model: str, top_k: int = 0, api_key_env: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3):
        from openai import OpenAI  # imported here: only runs with a server teacher pay for it

        self.url, self.model, self.top_k = url.rstrip("/"), model, top_k
        key = os.environ.get(api_key_env, NO_KEY) if api_key_env else NO_KEY
        self._redact = lambda text: text.replace(key, "[API key]") if key != NO_KEY else text  # error texts may echo it
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key=key, timeout=timeout, max_retries=max_retries)

    @classmethod
    def from_config(cls, cfg) -> "ServerTeacher":
        t = cfg.teacher
        return cls(t.server_url, t.server_model, t.server_top_k, t.api_key_env, t.server_timeout)

    def score(self, prompts: list[list[int]]) -> list[RowScores]:
        """Each prompt's echoed log-probs, in prompt order."""
        from openai import OpenAIError

        try:
            response = self.client.completions.create(
                model=self.model, prompt=prompts, max_tokens=0, echo=True, logprobs=self.top_k,
                extra_body={"return_tokens_as_token_ids": True})
        except OpenAIError as e:
            raise ServerTeacherError(f"teacher server {self.url}: {type(e).__name__}: {self._redact(str(e))}") from None
        choices = sorted(response.choices, key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise ServerTeacherError(f"teacher server {self.url} answered {len(choices)} choices for {len(prompts)} prompts")
        return [parse_choice(_as_dict(c.logprobs), p, self.top_k, self.url) for c, p in zip(choices, prompts)]

    def target(self, batch: dict, vocab: int):
        """The teacher signal for every predicted position of ``batch`` (on the batch's device)."""
        positions = real_positions(batch)
        ids = batch["input_ids"].cpu()
        rows = self.score([ids[b, pos].tolist() for b, pos in enumerate(positions)])
        shape = (ids.shape[0], ids.shape[1] - 1)
        signal = batch_signal(rows, positions, shape, self.top_k, vocab)
        device = batch["input_ids"].device
        if isinstance(signal, TokenLogprobs):
            return TokenLogprobs(signal.logp.to(device), 1.0)
        return TopKTail(signal.ids.to(device), signal.logprobs.to(device), signal.tail_mass.to(device), vocab, 1.0)


def _as_dict(logprobs) -> dict:
    """The openai client's Logprobs model (or a plain dict) as a dict."""
    if logprobs is None:
        raise ServerTeacherError("the teacher server returned no logprobs: it must support echo with logprobs")
    return logprobs if isinstance(logprobs, dict) else logprobs.model_dump()

