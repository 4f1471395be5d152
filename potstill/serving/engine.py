"""What `potstill serve` does with its one model: prompts to token ids, sampling (through `potstill.sampling`),
stop strings, and scoring (the model's own log-probabilities of given tokens, one plain forward per sequence).

Log-probabilities reported by the server are always the model's log-softmax at temperature 1 over its whole
vocabulary (vLLM's default), never the sampler's tempered/top-p distribution: a client scoring tokens gets the
same numbers whatever sampling settings it sends.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.generation.text import chat_prompt_ids, completion_text, eos_ids, without_eos
from potstill.sampling import SamplingSettings, sample
from potstill.serving.protocol import bad_request


@dataclass
class Choice:
    prompt_ids: list[int]
    tokens: list[int]  # the content tokens: no EOS, nothing after a stop string
    generated: int  # tokens the model produced for this choice (EOS included), as counted in usage
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class Scores:
    """For a sequence ids[0..L): chosen[i] = log p(ids[i+1] | ids[..i]), top[i] = the k most likely (id, log p)."""
    chosen: list[float]
    top: list[list[tuple[int, float]]]


class Engine:
    def __init__(self, model, tokenizer, model_name: str, max_logprobs: int = 20):
        self.model, self.tokenizer, self.model_name, self.max_logprobs = model, tokenizer, model_name, max_logprobs
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.device = next(model.parameters()).device

    # ---- prompts -------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The conversation as the model reads it before answering (``text.chat_prompt_ids``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(f"model {self.model_name!r} has no chat template (its tokenizer defines none); use "
                              "/v1/completions with a prompt instead", "messages")
        try:
            ids = chat_prompt_ids(self.tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's problem (roles, order)
            raise bad_request(f"the chat template cannot render these messages: {' '.join(str(exc).split())}",
                              "messages") from exc
        if not ids:
            raise bad_request("the rendered conversation has no tokens", "messages")
        return ids

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise bad_request("the prompt encodes to no tokens", "prompt")
        return list(ids)

    def completion_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """/v1/completions' ``prompt`` (text, token ids, or a list of either) → (text or None, ids) per prompt.
        Text is tokenised with special tokens (BOS), as vLLM does."""
        if isinstance(prompt, str):
            return [(prompt, self.encode_text(prompt))]
        if not prompt:
            raise bad_request("prompt is empty", "prompt")
        if all(isinstance(p, int) for p in prompt):
            return [(None, self.checked_ids(prompt))]
        if all(isinstance(p, str) for p in prompt):
            return [(p, self.encode_text(p)) for p in prompt]
        return [(None, self.checked_ids(p)) for p in prompt]

    def checked_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise bad_request("a token-id prompt is empty", "prompt")
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the model's vocabulary [0, {self.vocab})", "prompt")
        return list(ids)

    def check_room(self, prompt_ids: list[int], max_tokens: int) -> None:
        if self.context is not None and len(prompt_ids) + max_tokens > self.context:
            raise bad_request(f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the model's "
                              f"context of {self.context} tokens", "max_tokens")

    def room(self, prompt_ids: list[int]) -> int:
        """Default max_tokens of a chat request: the rest of the context (vLLM's default)."""
        if self.context is None:
            return 1024
        if len(prompt_ids) >= self.context:
            raise bad_request(f"the prompt ({len(prompt_ids)} tokens) fills the model's context of {self.context} tokens")
        return self.context - len(prompt_ids)

    def check_logprobs(self, k: int, param: str) -> None:
        if k > self.max_logprobs:
            raise bad_request(f"{param}={k} exceeds this server's maximum of {self.max_logprobs} "
                              "(potstill serve --max-logprobs)", param)

    # ---- generation and scoring (run in a worker thread, one request at a time) ------------------------------

    def generate(self, prompts: list[list[int]], settings: SamplingSettings, seed: int | None,
                 stops: list[str]) -> list[Choice]:
        """``settings.n`` choices per prompt, prompt-major (OpenAI's order)."""
        seed = secrets.randbits(63) if seed is None else seed
        try:
            out = sample(self.model, prompts, settings, eos_ids=self.eos, pad_id=self.pad, seed=seed)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        return [self._choice(prompts[p], tokens, done, stops)
                for p, tokens, done in zip(out.prompt_index, out.tokens, out.finished)]

    def _choice(self, prompt_ids: list[int], tokens: list[int], finished: bool, stops: list[str]) -> Choice:
        content = without_eos(tokens, finished)
        text = completion_text(self.tokenizer, prompt_ids, content)
        if stops and any(s in text for s in stops):
            for m in range(1, len(content) + 1):  # the fewest tokens whose text reaches a stop string
                text = completion_text(self.tokenizer, prompt_ids, content[:m])
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    return Choice(prompt_ids, content[:m], m, text[:cut], "stop")
        return Choice(prompt_ids, content, len(tokens), text, "stop" if finished else "length")

    @torch.no_grad()
    def score(self, ids: list[int], k: int) -> Scores:
        """The model's log-probability of each token after the first, and its top k at each position."""
        if len(ids) < 2:
            return Scores([], [])
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1]  # (L-1, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(-1, torch.tensor(ids[1:], device=self.device)[:, None]).squeeze(-1).tolist()
        if k == 0:
            return Scores(chosen, [[] for _ in chosen])
        values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
        top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return Scores(chosen, top)

