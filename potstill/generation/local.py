"""In-process teachers for `potstill generate`: teacher.path through potstill's sampler (backend local), or through
vLLM (backend vllm, when installed).

Local draws are reproducible per batch: prompts are cut into fixed batches of generate.batch_size in data order,
and each batch is sampled with a seed derived from (generate.seed, its first prompt id). A resumed run samples a
batch again only if one of its (prompt_id, sample) pairs is missing, and writes only the missing ones, so it
produces the same lines as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import logging

from potstill.generation.filters import Completion
from potstill.generation.prompts import Prompt
from potstill.generation.text import completion_text, eos_ids, without_eos
from potstill.sampling import SamplingSettings, sample

log = logging.getLogger("potstill.generate")


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def load_local_model(path: str, device: str = "auto", dtype: str = "auto", key: str = "teacher.path"):
    """(model in eval mode on its device, tokenizer) for a local HF directory, a hub id, or `builtin`."""
    from potstill import models, runtime
    from potstill.precision import resolve_model_dtype

    resolved = models.resolve_model_path(path)
    dev = runtime.resolve_device(device)
    model = models.load_causal_lm(resolved, resolve_model_dtype(dtype, dev), key).to(dev).eval()
    return model, models.load_tokenizer(resolved)


def batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    return [prompts[i: i + size] for i in range(0, len(prompts), size)]


class LocalBackend:
    """teacher.path sampled with `potstill.sampling.sample` (batched, KV cache, private seeded generator)."""

    def __init__(self, cfg, prompts: list[Prompt]):
        g = cfg.generate
        self.model, self.tokenizer = load_local_model(cfg.teacher.path, cfg.device, cfg.teacher.dtype)
        if any(p.messages is not None for p in prompts) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"data.train has chat records, but the tokenizer of teacher.path={cfg.teacher.path} has no "
                             "chat template to render them; use prompt/completion records")
        self.settings = SamplingSettings(g.max_new_tokens, g.temperature, g.top_p, g.n)
        self.settings.check("generate")
        self.batch_size, self.seed = g.batch_size, g.seed
        self.eos = eos_ids(self.model, self.tokenizer)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def unfit(self, ids: list[int]) -> str | None:
        if not ids:
            return "empty_prompt"
        if self.context is not None and len(ids) + self.settings.max_new_tokens > self.context:
            return "prompt_too_long"
        return None

    def run(self, prompts: list[Prompt], pending: set[tuple[int, int]], sink) -> None:
        n = self.settings.n
        for batch in batches(prompts, self.batch_size):
            if not any((p.prompt_id, s) in pending for p in batch for s in range(n)):
                continue  # done in an earlier run
            ids = {p.prompt_id: p.token_ids(self.tokenizer) for p in batch}
            usable = []
            for p in batch:
                reason = self.unfit(ids[p.prompt_id])
                if reason is None:
                    usable.append(p)
                for s in range(n) if reason else ():
                    if (p.prompt_id, s) in pending:
                        sink.reject(p.prompt_id, s, reason)
            if not usable:
                continue
            out = sample(self.model, [ids[p.prompt_id] for p in usable], self.settings, eos_ids=self.eos,
                         pad_id=self.pad, seed=derived_seed(self.seed, batch[0].prompt_id))
            for row, (index, tokens, finished) in enumerate(zip(out.prompt_index, out.tokens, out.finished)):
                prompt, s = usable[index], row % n
                if (prompt.prompt_id, s) in pending:
                    text = completion_text(self.tokenizer, ids[prompt.prompt_id], without_eos(tokens, finished))
                    sink.result(Completion(prompt.prompt_id, s, text, len(tokens), finished))


class VllmBackend:
    """teacher.path in vLLM (GPUs): one request per prompt with n samples and a seed from (seed, prompt id).
    Not exercised by the CPU test suite (vLLM is not installed there)."""

    def __init__(self, cfg):
        try:
            import vllm
        except ImportError:
            raise ValueError("generate.backend=vllm needs vLLM installed (pip install vllm, on a GPU machine); use "
                             "generate.backend=local, or serve the model with vLLM and use generate.backend=openai") from None
        from potstill import models

        g = cfg.generate
        self.vllm, self.g = vllm, g
        self.llm = vllm.LLM(model=models.resolve_model_path(cfg.teacher.path), seed=g.seed)
        self.tokenizer = self.llm.get_tokenizer()

    def run(self, prompts: list[Prompt], pending: set[tuple[int, int]], sink) -> None:
        g = self.g
        for chunk in batches(prompts, max(g.batch_size, 256)):
            todo = [p for p in chunk if any((p.prompt_id, s) in pending for s in range(g.n))]
            if not todo:
                continue
            params = [self.vllm.SamplingParams(n=g.n, temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_new_tokens,
                                               seed=derived_seed(g.seed, p.prompt_id)) for p in todo]
            inputs = [{"prompt_token_ids": p.token_ids(self.tokenizer)} for p in todo]
            for prompt, result in zip(todo, self.llm.generate(inputs, params, use_tqdm=False)):
                for s, choice in enumerate(result.outputs):
                    if (prompt.prompt_id, s) in pending:
                        sink.result(Completion(prompt.prompt_id, s, choice.text, len(choice.token_ids),
                                               choice.finish_reason == "stop"))
