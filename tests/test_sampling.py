"""The shared rollout routine (potstill/sampling.py) against transformers' generate and the definitions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from potstill.sampling import SamplingSettings, draw, sample, sampling_logprobs


@pytest.fixture(scope="module", params=["llama_teacher", "gpt2_teacher"])
def model(request, model_dirs):
    return AutoModelForCausalLM.from_pretrained(model_dirs[request.param]).eval()


PROMPTS = [[1, 20, 31, 44, 9], [1, 7], [1, 300, 12]]


def test_greedy_rows_equal_generate_on_each_prompt_alone(model, tokenizer):
    """Left padding and position ids: each batched row is what generate gives the prompt alone (no padding)."""
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    out = sample(model, PROMPTS, settings, eos_ids=[10_000], pad_id=tokenizer.pad_token_id)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[0, len(prompt):].tolist()
        assert tokens == ref
    assert out.finished == [False] * 3 and all(lp == [0.0] * 12 for lp in out.logprobs)


def test_a_row_that_stops_early_leaves_the_others_unchanged(model, tokenizer):
    """Greedy, with row 0's 4th token made an EOS id: every row is its EOS-free greedy run cut after its first
    EOS, so the rows still running after row 0 stops are untouched by it."""
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    free = sample(model, PROMPTS, settings, eos_ids=[10_000], pad_id=tokenizer.pad_token_id)
    stop = free.tokens[0][3]
    out = sample(model, PROMPTS, settings, eos_ids=[stop], pad_id=tokenizer.pad_token_id)
    for ref, tokens, logprobs, done in zip(free.tokens, out.tokens, out.logprobs, out.finished):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert tokens == ref[:cut] and logprobs == [0.0] * cut and done == (stop in ref)
    assert len(out.tokens[0]) <= 4 and max(len(t) for t in out.tokens) > len(out.tokens[0])


def test_sampled_logprobs_are_the_models_own_at_each_step(model, tokenizer):
    """Each recorded log-prob equals log_softmax(logits / T) of the full re-run sequence at that token."""
    settings = SamplingSettings(max_new_tokens=9, temperature=0.7, n=2)
    out = sample(model, PROMPTS, settings, eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seed=3)
    assert out.prompt_index == [0, 0, 1, 1, 2, 2]
    for row, (tokens, logprobs) in enumerate(zip(out.tokens, out.logprobs)):
        full = torch.tensor([PROMPTS[out.prompt_index[row]] + tokens])
        logits = model(full).logits[0, len(PROMPTS[out.prompt_index[row]]) - 1 : -1]  # predicts each new token
        ref = F.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_rows_stop_at_eos_and_include_it(model, tokenizer):
    """With every token an EOS id except one, rows stop at the first EOS drawn and keep it."""
    eos = list(range(3, len(tokenizer)))
    out = sample(model, PROMPTS, SamplingSettings(max_new_tokens=20), eos_ids=eos, pad_id=0, seed=0)
    for tokens, done in zip(out.tokens, out.finished):
        assert done == (tokens[-1] in eos)
        assert all(t not in eos for t in tokens[:-1])


def test_min_new_tokens_holds_eos_off_and_logs_the_renormalised_sampler(model, tokenizer):
    """With every token but ids 0-2 an EOS id, min_new_tokens = 5 of 8: no EOS among the first 5 tokens (whose
    log-probs are log_softmax over the non-EOS logits alone), and every row stops at the first EOS after them."""
    eos = list(range(3, len(tokenizer)))
    settings = SamplingSettings(max_new_tokens=8, min_new_tokens=5)
    out = sample(model, PROMPTS, settings, eos_ids=eos + [10_000], pad_id=0, seed=2)
    for prompt, tokens, logprobs, done in zip(PROMPTS, out.tokens, out.logprobs, out.finished):
        assert all(t < 3 for t in tokens[:5]) and (len(tokens) == 8 or tokens[-1] in eos)
        assert all(t < 3 for t in tokens[5:-1]) and done == (tokens[-1] in eos)
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : len(prompt) + 4]
        ref = F.log_softmax(logits[:, :3], -1).gather(-1, torch.tensor(tokens[:5])[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(logprobs[:5]), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert any(len(t) > 5 and t[5] in eos for t in out.tokens)  # EOS is drawable again from token 6 on


def test_same_seed_same_draws_and_global_rng_untouched(model, tokenizer):
    state = torch.get_rng_state()
    a = sample(model, PROMPTS, SamplingSettings(max_new_tokens=6), eos_ids=2, pad_id=0, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = sample(model, PROMPTS, SamplingSettings(max_new_tokens=6), eos_ids=2, pad_id=0, seed=5)
    c = sample(model, PROMPTS, SamplingSettings(max_new_tokens=6), eos_ids=2, pad_id=0, seed=6)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_top_p_keeps_the_smallest_head_reaching_p():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps the first two (0.5 + 0.3 reaches 0.8), renormalised."""
    logits = torch.tensor([[math.log(0.15), math.log(0.5), math.log(0.05), math.log(0.3)]])
    logp = sampling_logprobs(logits, SamplingSettings(top_p=0.8))
    assert torch.allclose(logp.exp(), torch.tensor([[0.0, 0.625, 0.0, 0.375]]), rtol=1e-6)
    logp = sampling_logprobs(logits, SamplingSettings(top_p=0.81))
    assert torch.allclose(logp.exp(), torch.tensor([[0.15, 0.5, 0.0, 0.3]]) / 0.95, rtol=1e-6)


def test_sampling_frequencies_follow_the_sampler_distribution(model, tokenizer):
    """4000 one-token draws from one prompt at T = 1.3, top_p 0.9 match the sampler's probabilities (chi-square)."""
    settings = SamplingSettings(max_new_tokens=1, temperature=1.3, top_p=0.9, n=4000)
    out = sample(model, [PROMPTS[0]], settings, eos_ids=[10_000], pad_id=0, seed=11)
    with torch.no_grad():
        probs = sampling_logprobs(model(torch.tensor([PROMPTS[0]])).logits[0, -1:], settings).exp()[0]
    counts = torch.bincount(torch.tensor([t[0] for t in out.tokens]), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support].double() * 4000
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


def test_draw_by_inversion_follows_the_distribution_and_never_draws_a_zero():
    """20000 rows of p = (0, 0.5, 0, 0.2, 0.3, 0): zero ids (first, middle, last) never drawn, frequencies within
    a chi-square bound; point masses on the first and on the last id are drawn every time."""
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    rows = 20_000
    ids = draw(p.log().expand(rows, -1), torch.Generator().manual_seed(7))
    counts = torch.bincount(ids, minlength=6).double()
    assert counts[[0, 2, 5]].sum() == 0 and ids.shape == (rows,)
    expected = p[[1, 3, 4]].double() * rows
    chi2 = float(((counts[[1, 3, 4]] - expected) ** 2 / expected).sum())
    assert chi2 < 2 + 5 * math.sqrt(2 * 2), chi2
    point_masses = torch.tensor([[0.0] + [float("-inf")] * 5, [float("-inf")] * 5 + [0.0]])
    assert draw(point_masses.repeat(500, 1), torch.Generator().manual_seed(1)).tolist() == [0, 5] * 500


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0).check()
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0).check("onpolicy")
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingSettings(max_new_tokens=4, min_new_tokens=5).check()
