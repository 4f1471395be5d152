"""The vLLM capture path's conversion, on prompt log-probs shaped exactly like vLLM's (plain data; vLLM itself
needs a GPU machine): it must produce the same cache as the HF builder in topk mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from potstill.data.encode import Example
from potstill.cache.reader import CacheReader
from potstill.cache.store import build_cache, build_cache_from
from potstill.cache.format import CacheError, CacheSpec
from potstill.cache.vllm_capture import encode_from_prompt_logprobs, topk_from_prompt_logprobs

V, K = 64, 6


def _vllm_like(logits: torch.Tensor, input_ids: list[int], k: int) -> list:
    """What vLLM returns: None, then per position t ≥ 1 the top-k of p(· | < t) plus the actual token."""
    logp = F.log_softmax(logits.float(), -1)  # (L, V): row t predicts token t + 1
    out = [None]
    for t in range(1, len(input_ids)):
        top = logp[t - 1].topk(k)
        row = {int(i): float(v) for v, i in zip(top.values, top.indices)}
        row[input_ids[t]] = float(logp[t - 1, input_ids[t]])
        out.append(row)
    return out


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("cross_tokenizer", [False, True])
def test_conversion_equals_the_hf_topk_cache(tmp_path, teacher, cross_tokenizer):
    """With the cross-tokenizer fields too: the prompt token's log-prob of each row is the HF builder's label_logprobs."""
    g = torch.Generator().manual_seed(1)
    examples = [Example(i, torch.randint(0, V, (n,), generator=g).tolist(), [0] * n) for i, n in enumerate([9, 4, 13])]
    spec = CacheSpec(mode="topk", vocab=V, k=K, shard_size=2, cross_tokenizer=cross_tokenizer)
    with torch.no_grad():
        scored = {e.example_id: _vllm_like(teacher(torch.tensor([e.input_ids])).logits[0], e.input_ids, K) for e in examples}
    encode = lambda members, advance: encode_from_prompt_logprobs(members, [scored[e.example_id] for e in members], spec)  # noqa: E731
    vllm_dir = build_cache_from(tmp_path / "vllm", examples, spec, encode, fingerprints={"teacher": "t"})
    hf_dir = build_cache(tmp_path / "hf", teacher, examples, spec, fingerprints={"teacher": "t"})
    a, b = CacheReader(vllm_dir), CacheReader(hf_dir)
    for e in examples:
        got, want = a.read(e.example_id), b.read(e.example_id)
        assert torch.equal(got["ids"], want["ids"])
        torch.testing.assert_close(got["logprobs"], want["logprobs"], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got["tail_mass"], want["tail_mass"], atol=2e-3, rtol=1e-3)
        assert set(got) == set(want) == {"ids", "logprobs", "tail_mass"} | ({"input_ids", "label_logprobs"} if cross_tokenizer else set())
        if cross_tokenizer:
            assert got["input_ids"].tolist() == want["input_ids"].tolist() == e.input_ids
            torch.testing.assert_close(got["label_logprobs"], want["label_logprobs"], rtol=1e-5, atol=1e-6)


def test_too_few_logprobs_is_a_clear_error():
    with pytest.raises(CacheError, match="raise vLLM's prompt_logprobs / max_logprobs to at least 4"):
        topk_from_prompt_logprobs([None, {1: -0.1, 2: -2.0}], k=4)
