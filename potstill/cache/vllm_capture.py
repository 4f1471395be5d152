"""A vLLM capture path for GPU users: the teacher's prompt log-probs from vLLM, stored as a top-k cache.

vLLM scores a prompt and returns, for every prompt position after the first, a dict {token_id: Logprob} with the
``prompt_logprobs`` most likely tokens (plus the actual prompt token when it is not among them). Entry t of that
list is the distribution of token t given tokens < t, i.e. potstill's predicted-position row t − 1. Notes:

- vLLM caps the number of returned log-probs by the engine argument ``max_logprobs`` (20 by default); this module
  raises it to k + 1 (the +1 is the prompt token that may come on top of the top k).
- vLLM's prompt log-probs are the raw model distribution (its default ``logprobs_mode="raw_logprobs"``: no
  temperature or penalties), so the cache's temperature must be 1.
- The tail mass is 1 − Σ top-k probabilities, computed from vLLM's (fp32) log-probs.
- With ``spec.cross_tokenizer`` the actual prompt token's log-prob of each row is stored too (and the token ids).

``topk_from_prompt_logprobs`` is plain data → tensors and is tested without vLLM; ``capture_topk_with_vllm`` needs
`pip install vllm` on a GPU machine.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from potstill.data.encode import Example
from potstill.cache.store import build_cache_from
from potstill.cache.format import CacheError, CacheSpec, finish_example, tensor_key, topk_tensors


def _as_float(value) -> float:
    return float(getattr(value, "logprob", value))  # vLLM's Logprob objects, or plain floats


def topk_from_prompt_logprobs(prompt_logprobs: list, k: int) -> dict[str, Tensor]:
    """vLLM ``prompt_logprobs`` of one example (L entries, the first None) → top-k tensors with P = L − 1 rows:
    ids (P, k) int64, logprobs (P, k) float16, tail_mass (P,) float16 — the cache's topk encoding."""
    rows = prompt_logprobs[1:]
    ids = torch.zeros(len(rows), k, dtype=torch.long)
    logprobs = torch.zeros(len(rows), k)
    for t, row in enumerate(rows):
        if row is None or len(row) < k:
            raise CacheError(f"position {t + 1} has {0 if row is None else len(row)} log-probs but the cache keeps "
                             f"k={k}: raise vLLM's prompt_logprobs / max_logprobs to at least {k}")
        best = sorted(((_as_float(v), int(tok)) for tok, v in row.items()), reverse=True)[:k]
        logprobs[t] = torch.tensor([lp for lp, _ in best])
        ids[t] = torch.tensor([tok for _, tok in best])
    return topk_tensors(ids, logprobs)


def encode_from_prompt_logprobs(examples: list[Example], prompt_logprobs: list[list], spec: CacheSpec) -> dict[str, Tensor]:
    """One shard's tensors, keyed like the HF builder's (``{example_id}/{name}``, ids in the narrow dtype)."""
    tensors = {}
    for example, scored in zip(examples, prompt_logprobs):
        if len(scored) != len(example.input_ids):
            raise CacheError(f"example {example.example_id}: vLLM returned {len(scored)} positions for "
                             f"{len(example.input_ids)} tokens (was the prompt re-tokenized?)")
        encoded = finish_example([topk_from_prompt_logprobs(scored, spec.k)], spec, example.input_ids)
        if spec.cross_tokenizer:  # vLLM returns the actual prompt token's log-prob in every row (raw: T = 1)
            encoded["label_logprobs"] = torch.tensor([_as_float(row[token]) for row, token in
                                                      zip(scored[1:], example.input_ids[1:])], dtype=torch.float32)
        tensors.update({tensor_key(example.example_id, name): t.contiguous() for name, t in encoded.items()})
    return tensors


def capture_topk_with_vllm(model: str, examples: list[Example], spec: CacheSpec, out_dir: str | Path, *,
                           fingerprints: dict[str, str], rank: int = 0, world_size: int = 1, **llm_kwargs) -> Path:
    """Build a top-k cache with vLLM as the teacher (token ids are passed as given: no re-tokenization)."""
    if spec.mode != "topk" or spec.temperature != 1.0:
        raise CacheError("the vLLM capture path writes topk caches at temperature 1 (vLLM's prompt log-probs are raw)")
    from vllm import LLM, SamplingParams  # optional dependency, GPU only
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, max_logprobs=spec.k + 1, **llm_kwargs)
    params = SamplingParams(max_tokens=1, prompt_logprobs=spec.k)

    def encode_shard(members: list[Example], advance) -> dict[str, Tensor]:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=e.input_ids) for e in members], params, use_tqdm=False)
        advance(len(members))
        return encode_from_prompt_logprobs(members, [o.prompt_logprobs for o in outputs], spec)

    return build_cache_from(out_dir, examples, spec, encode_shard, fingerprints=fingerprints, rank=rank,
                            world_size=world_size)
