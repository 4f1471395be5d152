"""Backend openai of `potstill generate`: any OpenAI-compatible server (`potstill serve`, vLLM, OpenAI) through
the maintained client (``openai.AsyncOpenAI``).

One request per (prompt, sample) with ``n=1`` and a seed derived from (generate.seed, prompt id, sample), so each
pair is retried, resumed and counted on its own, and a server that honours seeds (potstill serve, vLLM) gives
the same completion on a rerun. At most generate.concurrency requests are in flight. Retries are the client's
own: up to generate.max_retries more attempts on 408/409/429/5xx, timeouts and connection errors, with
exponential backoff (0.5 s doubling to 8 s, jittered; a Retry-After header is honoured). A pair that still fails
is logged by prompt id and counted, never dropped silently; the next run retries it. 401/403/404 (a wrong key or
model name) stop the run at once: every request would fail the same way.

The API key is read from the environment variable named by generate.api_key_env, handed to the client and
nowhere else: it is not part of the settings written to OUT.meta.json, and any text that could carry it (error
messages from the server) is redacted before it is logged.
"""
from __future__ import annotations

import asyncio
import logging

from potstill.api_keys import api_key_from_env
from potstill.generation.filters import Completion
from potstill.generation.local import derived_seed
from potstill.generation.prompts import Prompt

log = logging.getLogger("potstill.generate")
FATAL_STATUSES = (401, 403, 404)
ENDPOINTS = ("chat", "completions")


class OpenAIBackend:
    def __init__(self, cfg, prompts: list[Prompt]):
        g = cfg.generate
        if not g.model:
            raise ValueError("generate.backend=openai needs generate.model (the model name the server lists at /v1/models)")
        if g.endpoint not in ENDPOINTS:
            raise ValueError(f"generate.endpoint={g.endpoint!r}: use chat or completions")
        if g.endpoint == "completions" and any(p.messages is not None for p in prompts):
            raise ValueError("generate.endpoint=completions sends prompt text; data.train has chat records, use "
                             "generate.endpoint=chat")
        key = api_key_from_env("generate.api_key_env", g.api_key_env,
                               "; put the API key there (for a local potstill serve any value works)")
        self.g, self._key = g, key
        self.fatal: Exception | None = None

    def redact(self, text: str) -> str:
        return " ".join(text.replace(self._key, "[API key]").split())

    def run(self, prompts: list[Prompt], pending: set[tuple[int, int]], sink) -> None:
        todo = [(p, s) for p in prompts for s in range(self.g.n) if (p.prompt_id, s) in pending]
        asyncio.run(self._run(todo, sink))
        if self.fatal is not None:
            raise self.fatal

    async def _run(self, todo: list[tuple[Prompt, int]], sink) -> None:
        from openai import AsyncOpenAI

        g = self.g
        client = AsyncOpenAI(api_key=self._key, base_url=g.base_url, timeout=g.timeout, max_retries=g.max_retries)
        pairs = iter(todo)  # shared by the workers: the event loop runs one at a time, so next() never races

        async def worker() -> None:
            for prompt, sample in pairs:
                if self.fatal is not None:
                    return
                await self._one(client, prompt, sample, sink)

        async with client:
            await asyncio.gather(*(worker() for _ in range(min(g.concurrency, len(todo)))))

    async def _one(self, client, prompt: Prompt, sample: int, sink) -> None:
        import openai

        try:
            completion = await self._request(client, prompt, sample)
        except openai.APIStatusError as exc:
            message = f"HTTP {exc.status_code}: {self.redact(str(exc.message))}"
            if exc.status_code in FATAL_STATUSES:
                self.fatal = RuntimeError(f"the server refused the request ({message}); check generate.base_url, "
                                          "generate.model and the key in generate.api_key_env")
                return
            sink.failed(prompt.prompt_id, sample, message)
        except openai.APIError as exc:  # timeouts and connection errors, after the client's retries
            sink.failed(prompt.prompt_id, sample, f"{type(exc).__name__}: {self.redact(str(exc))}")
        else:
            sink.result(completion)

    async def _request(self, client, prompt: Prompt, sample: int) -> Completion:
        g = self.g
        common = {"model": g.model, "n": 1, "temperature": g.temperature, "top_p": g.top_p,
                  "seed": derived_seed(g.seed, prompt.prompt_id, sample)}
        if g.endpoint == "chat":
            reply = await client.chat.completions.create(messages=prompt.chat_messages(),
                                                         max_completion_tokens=g.max_new_tokens, **common)
            text = reply.choices[0].message.content or ""
        else:
            reply = await client.completions.create(prompt=prompt.prompt, max_tokens=g.max_new_tokens, **common)
            text = reply.choices[0].text
        tokens = reply.usage.completion_tokens if reply.usage is not None else 0
        return Completion(prompt.prompt_id, sample, text, tokens, reply.choices[0].finish_reason == "stop")
