"""The sampler's log-probs a rollout batch carries for the importance weight of sampled-token terms (``opd``).

A rollout micro-batch (``onpolicy/rollouts.py``) is collated right-padded as prompt + new tokens per row, with
labels on the new tokens. Its ``sampler_logprobs`` (B, T) is aligned with those labels: at a new token's position
the log-prob the sampler gave it (``sampling.Completions.logprobs``: after temperature and top-p), 0 elsewhere.
The loss path then weights each sampled token by ρ = q(y)/r(y): 1 when the sampler was the current student at
the loss' temperature, the correction for any other sampler (an older student from a replay buffer, another
temperature or top-p)."""
from __future__ import annotations

import torch

SAMPLER_LOGPROBS = "sampler_logprobs"  # the batch key train.shifted_sampler_logprobs reads


def aligned_sampler_logprobs(prompts: list[list[int]], logprobs: list[list[float]], width: int) -> torch.Tensor:
    """(B, width) fp32: row b holds ``logprobs[b]`` at positions len(prompts[b]) ... (its new tokens), else 0."""
    out = torch.zeros(len(prompts), width)
    for row, (prompt, lps) in enumerate(zip(prompts, logprobs)):
        if len(prompt) + len(lps) > width:
            raise ValueError(f"rollout row {row}: {len(prompt)} prompt + {len(lps)} new tokens exceed the batch width {width}")
        out[row, len(prompt): len(prompt) + len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return out
