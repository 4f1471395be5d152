"""Batched, KV-cached sampling from a causal LM: the one rollout routine behind `potstill generate` (local
backend), `potstill serve` and on-policy distillation.

Why not ``model.generate``: a rollout for distillation needs, per new token, the log-probability the *sampler*
gave it (importance weights when the policy has moved on, sampled-token distillation), a private seeded
``torch.Generator`` (sampling must not perturb the training RNG stream, so a resumed run draws the same
numbers), per-row EOS flags and exact lengths. The loop is short: one prefill with the KV cache, then one token
per step for every row until all have stopped; only the last position's logits are ever computed.

Prompts are left-padded so every row's next token sits in the last column; position ids are counted from each
row's first real token, so a padded row sees the same positions as it would alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    n: int = 1  # completions per prompt
    min_new_tokens: int = 0  # EOS ids cannot be drawn before this many new tokens (transformers' min_new_tokens)

    def check(self, where: str = "sampling") -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"{where}.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        check_temperature(self.temperature, f"{where}.temperature")
        check_top_p(self.top_p, f"{where}.top_p")
        if self.n < 1:
            raise ValueError(f"{where}.n must be ≥ 1, got {self.n}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"{where}.min_new_tokens must be in [0, max_new_tokens = {self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")


MIN_TEMPERATURE = 1e-3  # below this, logits ÷ T overflows fp32 for ordinary logit gaps: 0 (greedy) is meant


def check_temperature(value: float, key: str) -> None:
    """0 (greedy) or a finite temperature ≥ MIN_TEMPERATURE; NaN, inf and tiny values are refused by ``key``."""
    if value != 0 and not (math.isfinite(value) and value >= MIN_TEMPERATURE):
        raise ValueError(f"{key} must be 0 (greedy) or a finite number ≥ {MIN_TEMPERATURE}, got {value}")


def check_top_p(value: float, key: str) -> None:
    if not 0 < value <= 1:  # NaN fails both comparisons
        raise ValueError(f"{key} must be in (0, 1], got {value}")


@dataclass
class Completions:
    """Row r continues prompt ``prompt_index[r]`` (rows of one prompt are consecutive: n per prompt)."""

    prompt_index: list[int]
    tokens: list[list[int]]  # the new tokens; a finished row ends with its EOS token
    logprobs: list[list[float]]  # the sampler's log-probability of each new token (after temperature and top-p)
    finished: list[bool]  # stopped by an EOS token (else cut at max_new_tokens)

    def __len__(self) -> int:
        return len(self.tokens)


def left_padded(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids (B, T), attention_mask (B, T)) with every prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def sampling_logprobs(logits: Tensor, settings: SamplingSettings) -> Tensor:
    """(B, V) fp32 log-probs of the distribution tokens are drawn from: logits ÷ temperature, restricted to the
    smallest set of most likely tokens whose mass reaches top_p (the token crossing top_p is kept), renormalised.
    Greedy (temperature 0) is the point mass on the argmax."""
    logits = logits.float()
    if settings.temperature == 0:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    logp = F.log_softmax(logits if settings.temperature == 1 else logits / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above
        drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, mass_before >= settings.top_p)
        logp = F.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def draw(logp: Tensor, generator: torch.Generator) -> Tensor:
    """(B,) one id per row of (B, V) log-probs, by inversion: the first id whose cumulative probability reaches
    u · total, u ~ U(0, 1], one uniform per row. ``torch.multinomial`` draws an exponential for every vocabulary
    entry instead (4x slower at B = 8, V = 479 on one CPU core: a quarter of a tiny model's rollout). The CDF is
    fp64, so tokens far below fp32's resolution near 1 keep their probability. An id of probability 0 is never
    drawn: it would need cdf[id - 1] < u · total ≤ cdf[id] = cdf[id - 1] (or, for id 0, 0 < u · total ≤ 0)."""
    cdf = logp.exp().cumsum(-1, dtype=torch.float64)  # (B, V)
    u = 1 - torch.rand((cdf.shape[0], 1), generator=generator, dtype=torch.float64, device=cdf.device)  # (0, 1]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)


def first_eos_lengths(tokens: Tensor, eos: Tensor) -> tuple[Tensor, Tensor]:
    """(lengths (B,), finished (B,)) of rows cut at their first EOS token (kept), else at ``tokens``' width."""
    is_eos = torch.isin(tokens, eos)
    finished = is_eos.any(-1)
    return torch.where(finished, is_eos.int().argmax(-1) + 1, tokens.shape[-1]), finished


@torch.no_grad()
def sample(model: nn.Module, prompts: list[list[int]], settings: SamplingSettings, *, eos_ids: list[int] | int,
           pad_id: int, seed: int = 0) -> Completions:
    """``settings.n`` completions of every prompt (token id lists), drawn with a private generator seeded by
    ``seed`` (the global RNG state is untouched). Rows stop at the first token in ``eos_ids`` (never drawn
    before ``min_new_tokens``) or after ``max_new_tokens``. The model is used as it is (its train/eval mode is
    the caller's business).

    Per token only what decides the next step runs (draw, record, any-row-still-running): a row that has
    stopped keeps sampling with the others until all have (rows never interact), and what it draws after its
    EOS is cut off at the end, so no per-row masking is done step by step."""
    settings.check()
    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
    device = next(model.parameters()).device
    expanded = [p for p in prompts for _ in range(settings.n)]
    ids, mask = left_padded(expanded, pad_id, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows, width = ids.shape
    new_tokens = torch.full((rows, settings.max_new_tokens), pad_id, dtype=torch.long, device=device)
    new_logprobs = torch.zeros((rows, settings.max_new_tokens), device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    mask = torch.cat([mask, mask.new_ones(rows, settings.max_new_tokens)], dim=1)  # (B, T + max_new): sliced per step
    positions = (mask[:, :width].cumsum(-1) - 1).clamp_min(0)  # (B, T): each row counts from its first real token
    out = model(input_ids=ids, attention_mask=mask[:, :width], position_ids=positions, use_cache=True,
                logits_to_keep=1)
    next_position = positions[:, -1:] + 1
    eos = eos.to(device)
    steps = 0
    while True:
        logits = out.logits[:, -1]  # (B, V)
        if steps < settings.min_new_tokens:  # the sampler's distribution is then the one without EOS, renormalised
            logits = logits.index_fill(-1, eos[eos < logits.shape[-1]], float("-inf"))
        logp = sampling_logprobs(logits, settings)  # (B, V)
        token = draw(logp, generator) if settings.temperature > 0 else logp.argmax(-1)  # (B,)
        new_tokens[:, steps] = token
        new_logprobs[:, steps] = logp.gather(-1, token[:, None])[:, 0]
        finished |= torch.isin(token, eos)
        steps += 1
        if steps == settings.max_new_tokens or bool(finished.all()):
            break
        out = model(input_ids=token[:, None], attention_mask=mask[:, : width + steps], position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        next_position = next_position + 1
    length, finished = first_eos_lengths(new_tokens[:, :steps], eos)
    lengths, tokens, logprobs = length.tolist(), new_tokens.tolist(), new_logprobs.tolist()
    return Completions(prompt_index=[i for i in range(len(prompts)) for _ in range(settings.n)],
                       tokens=[t[:n] for t, n in zip(tokens, lengths)],
                       logprobs=[lp[:n] for lp, n in zip(logprobs, lengths)],
                       finished=finished.tolist())
