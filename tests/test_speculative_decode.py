"""The speculative decoder (potstill/speculative/decode.py): lossless against the target alone (greedy: the same
tokens; sampling: the same distribution, by an exact enumeration), KV caches equal to a fresh prefill after every
round, stopping rules, RNG hygiene and the adaptive γ rule."""
from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from potstill.sampling import SamplingSettings, sample, sampling_logprobs
from potstill.speculative.acceptance import best_gamma
from potstill.speculative import decode
from potstill.speculative.decode import SpeculativeResult, SpeculativeSettings, _GammaChooser, _Speculator, speculate

NO_EOS = [10_000]  # an id no model here can produce
PROMPTS = [[1], [1, 7, 3, 19], [1, 40, 2, 11, 5, 33, 8]]


def tiny_llama(seed: int, vocab: int, layers: int, hidden: int, init: float) -> LlamaForCausalLM:
    """A random Llama; ``init`` (the weights' std) well above the default 0.02 makes its distributions peaked, so
    greedy choices are not near-ties and a draft can disagree with the target for real."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with Gaussian noise (``scale`` × each matrix' std) on its matrices: a draft that agrees
    with the target often but not always."""
    noise = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=noise) * scale * p.std())
    return out


@pytest.fixture(scope="module")
def target():
    return tiny_llama(1, vocab=64, layers=2, hidden=32, init=0.2)


@pytest.fixture(scope="module")
def drafts(target):
    """A close draft (greedy α ≈ 0.5-0.7), an unrelated smaller one with 60 of the target's 64 ids, one with 72 ids
    (8 the target cannot emit: cut from its logits), the target."""
    return {"close": perturbed(target, 0.1, 7), "unrelated": tiny_llama(2, vocab=60, layers=1, hidden=16, init=0.2),
            "wider": tiny_llama(3, vocab=72, layers=1, hidden=16, init=0.2), "same": target}


def greedy_reference(model, prompt: list[int], max_new: int, eos=NO_EOS) -> list[int]:
    return sample(model, [prompt], SamplingSettings(max_new_tokens=max_new, temperature=0), eos_ids=eos,
                  pad_id=0).tokens[0]


def assert_same_greedy(model, prompt: list[int], got: list[int], ref: list[int]) -> None:
    """Equal, or the first difference is a genuine near-tie of the target's top two logits there (a verification
    forward over γ + 1 tokens sums in another order than one token at a time)."""
    if got == ref:
        return
    i = next(k for k, (a, b) in enumerate(zip(got, ref)) if a != b)
    with torch.no_grad():
        top2 = model(torch.tensor([prompt + ref[:i]])).logits[0, -1].topk(2).values
    assert float(top2[0] - top2[1]) < 1e-4, f"diverged at new token {i}: {got} vs {ref}"


# ---- greedy: the target's own greedy continuation --------------------------------------------------------------


@pytest.mark.parametrize("draft_name", ["close", "unrelated", "wider"])
@pytest.mark.parametrize("gamma,adaptive", [(1, False), (3, False), (8, False), (2, True)])
def test_greedy_equals_target_greedy(target, drafts, draft_name, gamma, adaptive):
    settings = SpeculativeSettings(max_new_tokens=24, gamma=gamma, adaptive=adaptive)
    rejected = accepted = 0
    committed_ids_beyond_the_draft = False
    for prompt in PROMPTS:
        out = speculate(target, drafts[draft_name], prompt, settings, eos_ids=NO_EOS)
        assert_same_greedy(target, prompt, out.tokens, greedy_reference(target, prompt, 24))  # here: equal
        assert sum(a + 1 for _, a in out.rounds) == len(out.tokens) == 24  # each round: accepted + 1 committed
        accepted += out.accepted
        rejected += out.verified - out.accepted
        committed_ids_beyond_the_draft |= any(t >= 60 for t in out.tokens)
    assert rejected > 0  # the test exercises rejections ...
    if draft_name == "close":
        assert accepted > 0  # ... and acceptances
    if draft_name == "unrelated":  # ... and ids the narrower draft cannot embed (shown to it as its last id)
        assert committed_ids_beyond_the_draft


@pytest.mark.parametrize("draft_name", ["close", "unrelated", "wider"])
def test_greedy_short_runs_and_eos_first_with_any_draft_width(target, drafts, draft_name):
    """Prompts of 1, 2 and 4 tokens, max_new_tokens 1, 2 and 7, γ 1 and 8: the target's greedy tokens; and with the
    target's first greedy token as EOS, that one token and finished."""
    for prompt in ([1], [1, 7], PROMPTS[1]):
        for max_new, gamma in ((1, 8), (2, 1), (7, 8)):
            out = speculate(target, drafts[draft_name], prompt, SpeculativeSettings(max_new_tokens=max_new,
                                                                                     gamma=gamma), eos_ids=NO_EOS)
            assert_same_greedy(target, prompt, out.tokens, greedy_reference(target, prompt, max_new))
        first = greedy_reference(target, prompt, 1)[0]
        out = speculate(target, drafts[draft_name], prompt, SpeculativeSettings(max_new_tokens=10, gamma=3),
                        eos_ids=first)
        assert out.tokens == [first] and out.finished


def test_greedy_with_the_target_as_draft_accepts_every_proposal(target):
    for gamma in (1, 4):
        out = speculate(target, target, PROMPTS[1], SpeculativeSettings(max_new_tokens=20, gamma=gamma),
                        eos_ids=NO_EOS)
        assert out.tokens == greedy_reference(target, PROMPTS[1], 20)
        assert out.acceptance_rate == out.alpha_measured == 1.0
        assert out.expected_accepted == out.verified == out.proposed
        assert all(a == g for g, a in out.rounds)
        full_rounds = 20 // (gamma + 1)  # then one shorter round fills up to max_new_tokens
        assert out.rounds[:full_rounds] == [(gamma, gamma)] * full_rounds


@pytest.mark.parametrize("pair", [("llama_teacher", "qwen2_student"), ("gpt2_teacher", "gpt2_student")])
def test_greedy_equals_target_greedy_on_saved_models(model_dirs, pair):
    """Two architectures loaded as checkpoints (GPT-2 has learned absolute positions: inferred from the cache)."""
    target, draft = (AutoModelForCausalLM.from_pretrained(model_dirs[name]).eval() for name in pair)
    for prompt in ([1, 20, 31, 44, 9], [1, 7]):
        out = speculate(target, draft, prompt, SpeculativeSettings(max_new_tokens=16, gamma=3), eos_ids=NO_EOS)
        assert_same_greedy(target, prompt, out.tokens, greedy_reference(target, prompt, 16))


# ---- sampling: the target's distribution, exactly ---------------------------------------------------------------


@torch.no_grad()
def exact_sequence_distribution(model, prompt: list[int], settings: SpeculativeSettings, eos: int) -> dict:
    """P(new tokens) under the target's own sampler, by enumerating every continuation of up to max_new_tokens
    tokens (one that ends at EOS stops there), from full forwards without any cache."""
    out = {}

    def extend(prefix: list[int], prob: float) -> None:
        if len(prefix) == settings.max_new_tokens or (prefix and prefix[-1] == eos):
            out[tuple(prefix)] = prob
            return
        logp = sampling_logprobs(model(torch.tensor([prompt + prefix])).logits[:, -1], settings.sampling())[0]
        for token in torch.nonzero(logp > float("-inf")).flatten().tolist():
            extend(prefix + [token], prob * math.exp(logp[token].item()))

    extend([], 1.0)
    return out


def g_test_p_value(counts: collections.Counter, probs: dict, n: int) -> float:
    """p-value of the G-test of observed sequence counts against exact probabilities, sequences expected fewer than
    5 times pooled into one bin; 0 when a sequence of probability 0 was drawn."""
    if any(seq not in probs for seq in counts):
        return 0.0
    frequent = [s for s in probs if probs[s] * n >= 5]
    rare = [s for s in probs if probs[s] * n < 5]
    observed = [counts[s] for s in frequent] + ([sum(counts[s] for s in rare)] if rare else [])
    expected = [probs[s] * n for s in frequent] + ([sum(probs[s] for s in rare) * n] if rare else [])
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    g = 2 * (o * torch.log(torch.where(o > 0, o / e, 1.0))).sum()
    return torch.special.gammaincc(torch.tensor((len(o) - 1) / 2, dtype=torch.float64), g / 2).item()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_sequences_are_distributed_as_the_target_samples(temperature, top_p):
    """4000 seeded runs, 3 new tokens over a 5-token vocabulary (EOS = 0), γ = 2: rounds with rejections (residual
    draws), with all drafts accepted (bonus draws) and short final rounds all occur. Two checks:

    - the G-test of the sequences against the exact enumeration (p ≈ 0.5 here); each of these one-line bugs fails it
      (checked by hand on 2000 runs, p < 1e-12 where computed): accepting with min(1, q/p); the residual |p − q|
      instead of max(0, p − q); the correction drawn from p instead of the residual; the bonus drawn from p_γ, from
      max(0, p_{γ+1} − q_γ) or from q_γ; counting every acceptance instead of the leading ones; and (at T = 0.7,
      top-p 0.8 only, as it must be) recording the draft's untransformed softmax as q while drawing from the
      transformed one;
    - Σ accepted against Σ expected_accepted (Σ_v min(p, q) over the verified positions, ``acceptance_z_score``),
      the direct check of the accept rule's calibration: here z = 1.03 and 0.15; accepting with min(1, p / (0.9 q))
      gives z = 8.3 and 4.9, with min(1, p / (0.5 q)) 36 and 5.9, so |z| < 3.5 fails both. (That ×0.9 bug distorts
      the sequences only mildly: on 2000 runs the G-test alone passed it at p = 0.006 and 0.044; on these 4000
      runs it gives p = 5e-6 and 1.3e-4.)"""
    target = tiny_llama(1, vocab=5, layers=1, hidden=16, init=0.2)
    draft = perturbed(target, 0.5, 7)
    settings = SpeculativeSettings(max_new_tokens=3, gamma=2, temperature=temperature, top_p=top_p)
    runs = [speculate(target, draft, [1], settings, eos_ids=0, seed=seed) for seed in range(4000)]
    first_rounds = collections.Counter(r.rounds[0] for r in runs)
    assert first_rounds[(2, 2)] > 100 and first_rounds[(2, 0)] > 100 and first_rounds[(2, 1)] > 100
    counts = collections.Counter(tuple(r.tokens) for r in runs)
    assert g_test_p_value(counts, exact_sequence_distribution(target, [1], settings, eos=0), len(runs)) > 1e-3
    assert abs(acceptance_z_score(runs)) < 3.5


@pytest.mark.parametrize("draft_vocab,top_p,gamma,max_new", [(4, 1.0, 2, 3), (4, 0.9, 8, 3), (8, 1.0, 2, 3),
                                                             (8, 0.9, 8, 3), (4, 1.0, 8, 1)])
def test_sampled_sequences_with_a_narrower_or_wider_draft_vocabulary(draft_vocab, top_p, gamma, max_new):
    """A 6-token target (EOS = 0) with an unrelated draft of 4 ids (the target's 4 and 5 it can neither propose nor
    embed: shown to it as its last id) or of 8 (2 the target cannot emit: cut), 1500 seeded runs from a 1-token
    prompt: the G-test against the exact enumeration and the acceptance z-test, as above."""
    target = tiny_llama(1, vocab=6, layers=1, hidden=16, init=0.2)
    draft = tiny_llama(4, vocab=draft_vocab, layers=1, hidden=16, init=0.2)
    settings = SpeculativeSettings(max_new_tokens=max_new, gamma=gamma, temperature=1.0, top_p=top_p)
    runs = [speculate(target, draft, [1], settings, eos_ids=0, seed=seed) for seed in range(1500)]
    counts = collections.Counter(tuple(r.tokens) for r in runs)
    assert g_test_p_value(counts, exact_sequence_distribution(target, [1], settings, eos=0), len(runs)) > 1e-3
    if max_new > 1:
        assert any(a < g for r in runs for g, a in r.rounds) and any(0 < a for r in runs for _, a in r.rounds)
        assert abs(acceptance_z_score(runs)) < 3.5
    if draft_vocab == 4:
        assert any(t >= 4 for r in runs for t in r.tokens)  # ids the draft cannot embed were committed


def acceptance_z_score(runs: list[SpeculativeResult]) -> float:
    """(Σ accepted − Σ expected_accepted) / σ over independent runs. Each verified position i is a Bernoulli trial
    with success probability a_i = Σ_v min(p_i, q_i) given the past, so the difference is a martingale with
    variance E Σ a_i (1 − a_i); per run Σ a_i (1 − a_i) = E_r − Σ a_i² ≤ E_r − E_r² / v_r (Cauchy–Schwarz, E_r the
    run's expected_accepted, v_r its verified count), a conservative σ that only needs the run totals."""
    accepted = sum(r.accepted for r in runs)
    expected = sum(r.expected_accepted for r in runs)
    variance = sum(r.expected_accepted - r.expected_accepted ** 2 / r.verified for r in runs if r.verified)
    return (accepted - expected) / math.sqrt(variance)


# ---- KV caches ------------------------------------------------------------------------------------------------


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_cache_is_a_fresh_prefill(model, cache, tokens: list[int]) -> None:
    """Every layer's keys and values equal those of one forward over ``tokens`` without a cache (fp32 rel 1e-5)."""
    assert cache.get_seq_length() == len(tokens)
    with torch.no_grad():
        fresh = model(torch.tensor([tokens]), use_cache=True).past_key_values
    for got, ref in zip(cache.layers, fresh.layers, strict=True):
        assert relative_error(got.keys, ref.keys) < 1e-5 and relative_error(got.values, ref.values) < 1e-5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_equal_a_fresh_prefill_of_the_committed_tokens_after_every_round(target, drafts, temperature):
    """After each round (rejections included): the target's cache holds exactly the committed tokens but the
    last, the draft's a prefix of them missing one or two (what the next round feeds it), both equal to a fresh
    prefill of those tokens — so positions and contents are right after every cut."""
    prompt = PROMPTS[1]
    settings = SpeculativeSettings(max_new_tokens=20, gamma=4, temperature=temperature)
    rounds = []

    def check(run: _Speculator) -> None:
        committed = run.seq[: run.committed].tolist()
        assert run.target.length == run.committed - 1
        assert_cache_is_a_fresh_prefill(run.target.model, run.target.cache, committed[:-1])
        assert_cache_is_a_fresh_prefill(run.draft.model, run.draft.cache, committed[: run.draft.length])
        rounds.append(run.committed - run.draft.length)

    run = _Speculator(target, drafts["close"], prompt, settings, seed=5)
    out = run.run(set(NO_EOS), on_round=check)
    assert run.seq[len(prompt): run.committed].tolist() == out.tokens
    assert all(pending in (1, 2) for pending in rounds[:-1])  # the last round may have proposed none
    assert 1 in rounds[:-1] and 2 in rounds[:-1]  # rounds with a rejection and with all accepted both occurred
    assert any(a < g for g, a in out.rounds)


# ---- stopping, bounds, randomness, settings ----------------------------------------------------------------------


def test_stops_at_the_first_eos_even_inside_an_accepted_run(target):
    """With the target as its own draft every proposal is accepted; an EOS as the third token of a 4-token round
    ends the sequence there (kept), and the drafts after it count as neither accepted nor verified."""
    free = greedy_reference(target, PROMPTS[0], 12)
    eos = free[2]
    assert eos not in free[:2]
    out = speculate(target, target, PROMPTS[0], SpeculativeSettings(max_new_tokens=12, gamma=4), eos_ids=[eos, 999])
    assert out.tokens == free[:3] and out.finished
    assert out.rounds == [(4, 3)] and out.verified == 3 and out.tokens_per_call == 3.0


def test_eos_as_the_correction_token(target, drafts):
    free = greedy_reference(target, PROMPTS[1], 24)
    out_free = speculate(target, drafts["close"], PROMPTS[1], SpeculativeSettings(max_new_tokens=24, gamma=3),
                         eos_ids=NO_EOS)
    # the committed token of the first round that rejected something: an EOS there ends the sequence
    at = next(sum(a + 1 for _, a in out_free.rounds[: i + 1]) - 1 for i, (g, a) in enumerate(out_free.rounds) if a < g)
    eos = free[at]
    assert free.index(eos) == at  # its first occurrence
    out = speculate(target, drafts["close"], PROMPTS[1], SpeculativeSettings(max_new_tokens=24, gamma=3), eos_ids=eos)
    assert out.tokens == free[: at + 1] and out.finished


def sampled_tokens_end_at_first_eos(tokens: list[int], eos: set[int]) -> bool:
    return tokens[-1] in eos and not any(t in eos for t in tokens[:-1])


def test_sampled_runs_stop_at_their_first_eos(target, drafts):
    eos = set(range(0, 64, 4))  # a quarter of the vocabulary
    for seed in range(10):
        out = speculate(target, drafts["close"], PROMPTS[1], SpeculativeSettings(max_new_tokens=30, gamma=4,
                                                                                  temperature=1.0),
                        eos_ids=list(eos), seed=seed)
        assert out.finished == sampled_tokens_end_at_first_eos(out.tokens, eos)
        assert out.finished or (len(out.tokens) == 30 and not eos & set(out.tokens))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_never_more_than_max_new_tokens(target, drafts, temperature):
    for max_new in (1, 2, 3, 5, 9):
        for name in ("same", "close"):
            out = speculate(target, drafts[name], PROMPTS[1], SpeculativeSettings(max_new_tokens=max_new, gamma=4,
                                                                                   temperature=temperature),
                            eos_ids=NO_EOS, seed=max_new)
            assert len(out.tokens) == max_new and not out.finished
            assert sum(a + 1 for _, a in out.rounds) == max_new  # nothing computed past the limit was committed
    one = speculate(target, target, PROMPTS[1], SpeculativeSettings(max_new_tokens=1), eos_ids=NO_EOS)
    assert one.rounds == [(0, 0)] and math.isnan(one.acceptance_rate) and one.tokens_per_call == 1.0


def test_seeded_private_generator(target, drafts):
    settings = SpeculativeSettings(max_new_tokens=16, gamma=3, temperature=1.0, top_p=0.9)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = speculate(target, drafts["close"], PROMPTS[1], settings, eos_ids=NO_EOS, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched ...
    torch.manual_seed(999)
    b = speculate(target, drafts["close"], PROMPTS[1], settings, eos_ids=NO_EOS, seed=11)
    assert (a.tokens, a.rounds) == (b.tokens, b.rounds)  # ... and does not matter
    others = {tuple(speculate(target, drafts["close"], PROMPTS[1], settings, eos_ids=NO_EOS, seed=s).tokens)
              for s in range(12, 16)}
    assert len(others | {tuple(a.tokens)}) > 1  # and the seed does


@pytest.mark.parametrize("field,value,message", [
    ("max_new_tokens", 0, "speculate.max_new_tokens must be ≥ 1"),
    ("temperature", -0.5, r"speculate.temperature must be 0 \(greedy\) or a finite number ≥ 0.001"),
    ("temperature", float("nan"), r"speculate.temperature must be 0 \(greedy\) or a finite number"),
    ("top_p", 0.0, r"speculate.top_p must be in \(0, 1\]"),
    ("gamma", 0, "speculate.gamma must be ≥ 1"),
    ("gamma_max", 0, "speculate.gamma_max must be ≥ 1"),
])
def test_settings_check_names_the_field(target, field, value, message):
    with pytest.raises(ValueError, match=message):
        speculate(target, target, [1], SpeculativeSettings(**{field: value}), eos_ids=NO_EOS)


def test_bad_calls_raise_one_clear_line(target):
    with pytest.raises(ValueError, match="gamma .* must be ≤ gamma_max = 4 when adaptive"):
        SpeculativeSettings(gamma=6, gamma_max=4, adaptive=True).check()
    SpeculativeSettings(gamma=6, gamma_max=4).check()  # a fixed γ ignores gamma_max
    with pytest.raises(ValueError, match="prompt needs at least one token"):
        speculate(target, target, [], SpeculativeSettings(), eos_ids=NO_EOS)


# ---- adaptive γ and the result's statistics -------------------------------------------------------------------


def test_adaptive_gamma_is_best_gamma_of_the_running_estimates():
    chooser = _GammaChooser(SpeculativeSettings(gamma=3, adaptive=True, gamma_max=8))
    assert chooser.next() == 3  # nothing measured yet: the first round's γ
    chooser.record(proposed=3, accepted=3, verified=3, draft_seconds=0.15, target_seconds=0.5)
    chooser.record(proposed=5, accepted=2, verified=3, draft_seconds=0.25, target_seconds=0.5)
    alpha, cost = (5 + 1) / (6 + 2), (0.4 / 8) / (1.0 / 2)  # Beta(1, 1) posterior mean; draft / target per forward
    assert chooser.next() == best_gamma(alpha, cost, 8) == 5
    expensive = _GammaChooser(SpeculativeSettings(gamma=3, adaptive=True, gamma_max=8))
    expensive.record(proposed=4, accepted=1, verified=2, draft_seconds=2.0, target_seconds=1.0)
    assert expensive.next() == 1  # a draft slower than the target with α̂ = 0.5: propose the fewest
    fixed = _GammaChooser(SpeculativeSettings(gamma=3))
    fixed.record(proposed=3, accepted=3, verified=3, draft_seconds=0.0, target_seconds=1.0)
    assert fixed.next() == 3


@pytest.mark.parametrize("draft_cost", [0.05, 0.4])
def test_adaptive_run_uses_gammas_up_to_gamma_max(target, drafts, monkeypatch, draft_cost):
    """A fake clock (each draft forward costs ``draft_cost``, each target forward 1) makes the run deterministic:
    every round after the first proposes best_gamma(α̂, ĉ = draft_cost, gamma_max) of the rounds before it (cut so
    the round commits no token past max_new_tokens), and the tokens are the target's greedy ones."""
    now = [0.0]
    forward = decode._CachedModel.forward

    def timed_forward(self, ids, keep):
        now[0] += 1.0 if self.model is target else draft_cost
        return forward(self, ids, keep)

    monkeypatch.setattr(decode._CachedModel, "forward", timed_forward)
    monkeypatch.setattr(decode, "device_clock", lambda device: now[0])
    settings = SpeculativeSettings(max_new_tokens=40, gamma=2, adaptive=True, gamma_max=6)
    out = speculate(target, drafts["close"], PROMPTS[1], settings, eos_ids=NO_EOS)
    assert out.tokens == greedy_reference(target, PROMPTS[1], 40)
    accepted = verified = committed = 0
    for i, (g, a) in enumerate(out.rounds):
        best = 2 if i == 0 else best_gamma((accepted + 1) / (verified + 2), draft_cost, 6)
        assert g == min(best, 40 - committed - 1), (i, out.rounds)
        accepted, verified, committed = accepted + a, verified + a + (a < g), committed + a + 1
    assert out.draft_seconds == pytest.approx(draft_cost * (1 + out.proposed), rel=1e-9)  # its prefill: 1 forward
    gammas = {g for g, _ in out.rounds[1:-1]}
    assert gammas == ({1, 2, 3, 4} if draft_cost == 0.05 else {1}), out.rounds  # the choice follows α̂ and ĉ


def test_result_statistics():
    out = SpeculativeResult(tokens=[5, 6, 7, 8, 9, 2], finished=True, rounds=[(4, 2), (4, 1)], expected_accepted=2.5,
                            verified=5)
    assert (out.proposed, out.accepted, out.target_calls) == (8, 3, 2)
    assert out.acceptance_rate == 3 / 8 and out.alpha_measured == 3 / 5 and out.alpha_expected == 0.5
    assert out.tokens_per_call == 3.0


def test_each_model_is_fed_only_what_it_has_not_seen(target, drafts):
    """Forward hooks count what each model is given: the target one prefill and then one forward of γ + 1 tokens
    per round (γ + 1 logits kept), the draft one prefill and then one forward of 1 or 2 tokens per proposal (one
    logit kept); so no prefix is ever run again."""
    seen = {"target": [], "draft": []}
    hooks = [model.register_forward_hook(lambda m, args, kwargs, out, who=who: seen[who].append(
        (kwargs["input_ids"].shape[1], out.logits.shape[1])), with_kwargs=True)
        for who, model in (("target", target), ("draft", drafts["close"]))]
    try:
        prompt = PROMPTS[2]
        settings = SpeculativeSettings(max_new_tokens=30, gamma=3, temperature=1.0)
        out = speculate(target, drafts["close"], prompt, settings, eos_ids=NO_EOS, seed=1)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["target"][0][0] == seen["draft"][0][0] == len(prompt) - 1  # the prefills
    assert seen["target"][1:] == [(g + 1, g + 1) for g, _ in out.rounds]
    assert len(seen["draft"]) == 1 + out.proposed and all(kept == 1 for _, kept in seen["draft"])
    fed = [n for n, _ in seen["draft"][1:]]
    assert set(fed) == {1, 2}  # 2: a round after one whose drafts were all accepted
