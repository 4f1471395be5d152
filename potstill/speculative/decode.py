"""Lossless speculative decoding (Leviathan et al. 2023, Chen et al. 2023) of one prompt with a target and a draft
model, both KV-cached.

A round: the draft proposes γ tokens d_1..d_γ autoregressively (recording its sampling distribution q_i); the target
scores [last committed token, d_1..d_γ] in one forward (p_1..p_{γ+1}); d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from norm(max(0, p_i − q_i)), and when all γ
are accepted a bonus token is drawn from p_{γ+1}. Every committed token is then distributed exactly as the target's
own sampler would draw it (same temperature and top-p, ``sampling.sampling_logprobs`` applied to both models). Greedy
decoding (temperature 0) is the same rule with point masses: accept while d_i is the target's argmax, then commit the
target's argmax. With q_{γ+1} := 0 the correction and the bonus are one formula, max(0, p_n − q_n) at the first
position n not accepted, which is how ``rejection_step`` draws both.

Cache bookkeeping (``_CachedModel``): each model's cache holds a prefix of the committed tokens and the count of them
it holds is tracked. At the start of a round the target's cache holds all committed tokens but the last (which is the
first input of the verification forward); the draft's holds all but the last one or two. Each model is fed exactly
the committed tokens it has not seen, never the prefix again, and after the round both caches are cut back
(``_truncate``) to the committed tokens they saw: the target's to all but the newly committed last token, the
draft's to what it saw of the accepted drafts (it never saw its own last proposal).

Per round there is one host synchronisation (the accepted count, the drafted and the committed token come back
together); the drafted tokens are written straight into a device buffer of the sequence, so the inputs of every
forward are views of it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from potstill.sampling import SamplingSettings, draw, sampling_logprobs
from potstill.speculative.acceptance import best_gamma, expected_acceptance


@dataclass(frozen=True)
class SpeculativeSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy; > 0 = speculative sampling (rejection rule), lossless w.r.t. the target's
    top_p: float = 1.0  # sampling distribution (sampling.sampling_logprobs applied to both models)
    gamma: int = 4  # draft tokens per round (fixed), or the first round's γ when adaptive
    adaptive: bool = False  # pick γ each round from the running α estimate and measured draft/target cost
    gamma_max: int = 8

    def sampling(self) -> SamplingSettings:
        """The target-only sampler with the same distribution (the baseline, and the transform both models use)."""
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p)

    def check(self, where: str = "speculate") -> None:
        self.sampling().check(where)
        if self.gamma < 1:
            raise ValueError(f"{where}.gamma must be ≥ 1 (draft tokens per round), got {self.gamma}")
        if self.gamma_max < 1:
            raise ValueError(f"{where}.gamma_max must be ≥ 1, got {self.gamma_max}")
        if self.adaptive and self.gamma > self.gamma_max:
            raise ValueError(f"{where}.gamma (the first round's, {self.gamma}) must be ≤ gamma_max = "
                             f"{self.gamma_max} when adaptive")


@dataclass
class SpeculativeResult:
    tokens: list[int]  # new tokens (a finished sequence ends with its EOS token), at most max_new_tokens
    finished: bool
    rounds: list[tuple[int, int]] = field(default_factory=list)  # per round: (draft tokens proposed, accepted)
    expected_accepted: float = 0.0  # Σ over verified draft positions of Σ_v min(p, q) (the analytic α's numerator)
    verified: int = 0  # draft positions the target verified (accepted + rejected ones)
    draft_seconds: float = 0.0  # time inside the draft's forwards (prefill and its draws included)
    target_seconds: float = 0.0  # time inside the target's forwards (prefill and the acceptance decision included)

    @property
    def proposed(self) -> int:
        return sum(g for g, _ in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(a for _, a in self.rounds)

    @property
    def target_calls(self) -> int:
        """Verification forwards of the target (its prefill is not counted)."""
        return len(self.rounds)

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (NaN when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else math.nan

    @property
    def alpha_measured(self) -> float:
        """accepted / verified: the per-position acceptance probability α (positions after a round's first
        rejection were never tested; NaN when nothing was verified)."""
        return self.accepted / self.verified if self.verified else math.nan

    @property
    def alpha_expected(self) -> float:
        """expected_accepted / verified: the analytic α, Σ_v min(p, q) averaged over the verified positions."""
        return self.expected_accepted / self.verified if self.verified else math.nan

    @property
    def tokens_per_call(self) -> float:
        """τ: committed tokens per target verification call (the correction or bonus token counted)."""
        return len(self.tokens) / self.target_calls if self.target_calls else math.nan


def _truncate(cache, length: int) -> None:
    """Cut a KV cache back to its first ``length`` tokens. ``crop`` is given the (negative) number of tokens to remove,
    the form both transformers 4.x and 5.x accept (5.x refuses a positive target length)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def device_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rows(module: nn.Module | None) -> int | None:
    return None if module is None else module.weight.shape[0]


class _CachedModel:
    """A causal LM with its KV cache and the number of committed tokens the cache holds (``length``)."""

    def __init__(self, model: nn.Module, width: int, is_draft: bool = False):
        self.model, self.width = model, width  # width: the target's vocabulary width, which logits are brought to
        self.cache = None
        self.length = 0
        self.seconds = 0.0
        # The target may commit an id the draft has no embedding for (a padded row of the target's head, e.g. a
        # 151,936-row draft for a 152,064-row target): the draft is shown its last id instead. What it is shown only
        # shapes its proposals, which the rule verifies, so the output stays exact. The target is never clamped: a
        # target whose embedding is narrower than its head fails loudly, as ``sampling.sample`` does.
        rows = _rows(model.get_input_embeddings()) if is_draft else None
        self.last_id = rows - 1 if rows is not None and rows < width else None

    def forward(self, ids: Tensor, keep: int) -> Tensor:
        """fp32 logits (keep, width) of the last ``keep`` positions of ``ids`` (1, n), which follow the cache."""
        if self.last_id is not None:
            ids = ids.clamp_max(self.last_id)
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.cache = out.past_key_values
        logits = out.logits[0].float()
        if logits.shape[-1] > self.width:  # ids the target cannot emit: never worth proposing
            logits = logits[:, : self.width]
        elif logits.shape[-1] < self.width:  # ids this model cannot emit: probability 0
            logits = torch.nn.functional.pad(logits, (0, self.width - logits.shape[-1]), value=float("-inf"))
        return logits

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens in the cache (a prefix of the committed tokens)."""
        self.length = min(self.length, length)
        if self.cache is not None:
            _truncate(self.cache, self.length)


@dataclass
class _Round:
    """What one round's verification decided, on the host (``drafted`` is read after the committed token was written
    into the sequence, so only its first ``accepted`` entries are drafts for sure)."""

    drafted: list[int]  # d_1..d_n, then (n < g) the correction token in place of d_{n+1}, then d_{n+2}..d_g
    accepted: int  # n: the leading drafts the rule accepted
    token: int  # the correction (n < g) or bonus (n = g) token
    expected: Tensor  # (g,) Σ_v min(p_i, q_i) per drafted position, on the device


class _Speculator:
    """State of one ``speculate`` call: both cached models, the committed sequence on the device, the generator."""

    def __init__(self, target: nn.Module, draft: nn.Module, prompt: list[int], settings: SpeculativeSettings,
                 seed: int):
        self.device = next(target.parameters()).device
        if next(draft.parameters()).device != self.device:
            raise ValueError(f"speculate: the draft is on {next(draft.parameters()).device} but the target on "
                             f"{self.device}; move both to one device")
        width = _rows(target.get_output_embeddings()) or target.config.vocab_size
        self.target, self.draft = _CachedModel(target, width), _CachedModel(draft, width, is_draft=True)
        self.settings, self.sampling = settings, settings.sampling()
        self.greedy = settings.temperature == 0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seq = torch.zeros(len(prompt) + settings.max_new_tokens + 1, dtype=torch.long, device=self.device)
        self.seq[: len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.committed = len(prompt)  # tokens of seq that are final (prompt + new)

    def prefill(self) -> None:
        """Both caches take all prompt tokens but the last (the first input of the first round)."""
        for model in (self.target, self.draft):
            if self.committed > 1:
                start = device_clock(self.device)
                model.forward(self.seq[None, : self.committed - 1], keep=1)
                model.length = self.committed - 1
                model.seconds += device_clock(self.device) - start

    def propose(self, g: int) -> list[Tensor]:
        """Draw d_1..d_g from the draft into seq[committed:]; returns the rows log q_i (1, V) (greedy: none)."""
        rows, start, end = [], self.draft.length, self.committed
        for i in range(g):
            logits = self.draft.forward(self.seq[None, start:end], keep=1)  # (1, V)
            if self.greedy:
                token = logits.argmax(-1)
            else:
                logq = sampling_logprobs(logits, self.sampling)
                rows.append(logq)
                token = draw(logq, self.generator)
            self.seq[end:end + 1] = token
            start, end = end, end + 1
        self.draft.length = start  # it saw everything but its last proposal
        return rows

    def verify(self, g: int, rows: list[Tensor]) -> _Round:
        """One target forward over [last committed, d_1..d_g]; the accepted count and the committed token."""
        L = self.committed
        logits = self.target.forward(self.seq[None, L - 1: L + g], keep=g + 1)  # (g + 1, V): p_1..p_{g+1}
        self.target.length = L + g
        drafted = self.seq[L: L + g]
        if self.greedy:
            best = logits.argmax(-1)  # (g + 1,)
            agree = drafted == best[:g]
            accepted = (~agree).cumsum(0).eq(0).sum()  # leading agreements
            token = best.index_select(0, accepted.view(1))  # (1,); best[accepted] would read it on the host
            expected = agree.float()  # Σ min(p, q) of two point masses: 1 if they coincide, else 0
        else:
            logp = sampling_logprobs(logits, self.sampling)  # (g + 1, V)
            accepted, token, expected = rejection_step(logp, torch.cat(rows) if rows else logp[:0], drafted,
                                                       self.generator)
            token = token.view(1)
        self.seq.index_copy_(0, (accepted + L).view(1), token)  # no host sync: the position is a device tensor
        host = torch.cat([drafted, token, accepted.view(1)]).tolist()  # the round's one synchronisation
        return _Round(drafted=host[:g], accepted=host[g + 1], token=host[g], expected=expected)

    @torch.no_grad()
    def run(self, eos: set[int], on_round: Callable[[_Speculator], None] | None = None) -> SpeculativeResult:
        """Prefill, then rounds until an EOS is committed or max_new_tokens are; ``on_round`` (tests) sees the state
        after each round's bookkeeping."""
        limit = self.settings.max_new_tokens
        self.prefill()
        result = SpeculativeResult(tokens=[], finished=False)
        gammas = _GammaChooser(self.settings)
        expected = torch.zeros((), device=self.device)
        while len(result.tokens) < limit and not result.finished:
            g = min(gammas.next(), limit - len(result.tokens) - 1)  # a round commits at most g + 1 tokens
            start = device_clock(self.device)  # (the previous round's sync has already emptied the queue)
            rows = self.propose(g)
            middle = device_clock(self.device)
            decided = self.verify(g, rows)
            end = device_clock(self.device)
            self.draft.seconds += middle - start
            self.target.seconds += end - middle
            new, accepted, verified, result.finished = _settle(decided, g, eos)
            result.tokens += new
            result.rounds.append((g, accepted))
            result.verified += verified
            expected += decided.expected[:verified].sum()
            gammas.record(g, accepted, verified, middle - start, end - middle)
            self.committed += len(new)
            self.target.truncate(self.committed - 1)  # all committed tokens but the last, which it has not seen
            self.draft.truncate(self.committed - 1)  # what it saw of the accepted drafts
            if on_round is not None:
                on_round(self)
        result.expected_accepted = float(expected)
        result.draft_seconds, result.target_seconds = self.draft.seconds, self.target.seconds
        return result


class _GammaChooser:
    """γ for the next round. Fixed: ``settings.gamma``. Adaptive: ``best_gamma(α̂, ĉ, gamma_max)``, the γ that
    maximises the expected speed-up τ(α, γ) / (γ·c + 1) (``acceptance.py``) under the running estimates: α̂ the
    posterior mean of the acceptance probability under a Beta(1, 1) prior, (accepted + 1) / (verified + 2), and ĉ
    the measured cost of one draft forward relative to one target verification forward in this call (prefills
    excluded). transformers' heuristic (γ + 2 after a fully accepted round, γ − 1 otherwise) reacts to the last
    round only and ignores what the draft costs; this rule uses both and jumps straight to the best γ. The first
    round, before any forward has been timed, uses ``settings.gamma``."""

    def __init__(self, settings: SpeculativeSettings):
        self.settings = settings
        self.accepted = self.verified = 0
        self.draft_seconds = self.target_seconds = 0.0
        self.draft_forwards = self.target_forwards = 0

    def record(self, proposed: int, accepted: int, verified: int, draft_seconds: float, target_seconds: float) -> None:
        self.accepted += accepted
        self.verified += verified
        self.draft_seconds += draft_seconds
        self.draft_forwards += proposed
        self.target_seconds += target_seconds
        self.target_forwards += 1

    def next(self) -> int:
        if not self.settings.adaptive or self.draft_forwards == 0 or self.target_seconds <= 0:
            return self.settings.gamma  # fixed, or nothing timed yet
        alpha = (self.accepted + 1) / (self.verified + 2)
        cost = (self.draft_seconds / self.draft_forwards) / (self.target_seconds / self.target_forwards)
        return best_gamma(alpha, cost, self.settings.gamma_max)


def _settle(decided: _Round, g: int, eos: set[int]) -> tuple[list[int], int, int, bool]:
    """(tokens committed, drafts accepted, positions verified, finished) of a round: the accepted drafts and the
    correction or bonus token, cut after the first EOS (drafts past it count as neither accepted nor verified)."""
    new, accepted = decided.drafted[: decided.accepted] + [decided.token], decided.accepted
    verified = accepted + (accepted < g)  # positions after the first rejection were never tested
    stop = next((i for i, t in enumerate(new) if t in eos), None)
    if stop is None:
        return new, accepted, verified, False
    return new[: stop + 1], min(accepted, stop + 1), min(verified, stop + 1), True


def rejection_step(target_logp: Tensor, draft_logp: Tensor, drafted: Tensor,
                   generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """The rejection rule for one round, batched over leading dimensions (...): target_logp (..., g + 1, V) the
    target's log p_1..p_{g+1}, draft_logp (..., g, V) the draft's log q_1..q_g (both after the same sampling
    transform), drafted (..., g) the drafts d_i ~ q_i. Accept d_i with probability min(1, p_i(d_i) / q_i(d_i))
    (u·q < p with u ~ U[0, 1), so a token the target gives probability 0 is never accepted); then draw from
    max(0, p_n − q_n) at the first position n not accepted, with q_{g+1} := 0 (the bonus is drawn from p_{g+1}).
    Returns (accepted n (...), the correction or bonus token (...), Σ_v min(p_i, q_i) (..., g)); no host sync."""
    g, width = drafted.shape[-1], target_logp.shape[-1]
    at_draft = drafted[..., None]
    p_draft = target_logp[..., :g, :].gather(-1, at_draft)[..., 0].exp()
    q_draft = draft_logp.gather(-1, at_draft)[..., 0].exp()
    u = torch.rand(drafted.shape, generator=generator, dtype=p_draft.dtype, device=p_draft.device)
    accepted = (u * q_draft >= p_draft).cumsum(-1).eq(0).sum(-1)  # (...) leading acceptances
    row = accepted[..., None, None].expand(*accepted.shape, 1, width)
    p_row = target_logp.gather(-2, row)[..., 0, :].exp()  # (..., V): p_n
    q_row = draft_logp.gather(-2, row.clamp_max(g - 1))[..., 0, :].exp() if g else torch.zeros_like(p_row)
    q_row = q_row * (accepted < g)[..., None]  # q_{g+1} := 0
    residual = (p_row - q_row).clamp_min(0)
    # A rejection implies p ≠ q there, so the residual has mass; should rounding leave none, p itself is drawn
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_row)
    # draw normalises: unnormalised log-weights are fine
    token = draw(residual.log().reshape(-1, width), generator).view(accepted.shape)
    return accepted, token, expected_acceptance(draft_logp, target_logp[..., :g, :])


def speculate(target: nn.Module, draft: nn.Module, prompt: list[int], settings: SpeculativeSettings, *,
              eos_ids: list[int] | int, seed: int = 0) -> SpeculativeResult:
    """Continue ``prompt`` (token ids, batch 1) with the target's distribution, proposals from ``draft``: greedy
    (temperature 0) gives the target's greedy continuation, sampling gives samples distributed as
    ``sampling.sample`` would draw them from the target (not the same draws). Random numbers come from a private
    generator seeded by ``seed`` (the global RNG state is untouched). Stops at the first committed token in
    ``eos_ids`` (kept) or after ``max_new_tokens``; a round near that limit proposes fewer drafts, so no token past
    it is ever computed. Both models are used as they are (train/eval mode is the caller's business) and must share
    the tokenizer; their output widths may differ (padded rows): the draft's logits are brought to the target's."""
    settings.check()
    if not prompt:
        raise ValueError("speculate: the prompt needs at least one token (e.g. BOS)")
    return _Speculator(target, draft, prompt, settings, seed).run({eos_ids} if isinstance(eos_ids, int) else
                                                                  set(eos_ids))
