"""Student rollouts as training micro-batches: each example's prompt, one batched ``sampling.sample`` call on the
unwrapped student, and the batch the loop expects with labels on the generated tokens only.

A row's prompt is its tokens before the first label (prompt/completion and chat records: the prompt, or the
conversation up to the first assistant turn). A ``text`` record is trained on every token (its position-0 label
is set), so it has no prompt: BOS + ``prompt_tokens`` first tokens stand in for one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from potstill.data.batches import collate
from potstill.data.encode import Example
from potstill.importance import SAMPLER_LOGPROBS, aligned_sampler_logprobs
from potstill.labels import IGNORE_INDEX
from potstill.sampling import Completions, SamplingSettings, sample


def rollout_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The rollout generator's seed for one micro-batch: a function of (seed, step, rank, micro-batch) only, so a
    resumed run samples the same tokens and ranks sample independently."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0] >> 1)


def prompts_of(batch: dict, bos_id: int | None, prompt_tokens: int) -> list[list[int]]:
    """Each row's prompt ids (see the module docstring)."""
    prompts = []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        length = sum(mask)
        if labels[0] != IGNORE_INDEX:  # a text record: every token is trained
            # never its last token (the EOS encoding appends): a rollout must not continue past a finished text
            n = min((1 if bos_id is not None and ids[0] == bos_id else 0) + prompt_tokens, length - 1)
        else:
            n = next((i for i, lab in enumerate(labels[:length]) if lab != IGNORE_INDEX), length)
        prompts.append(ids[: max(1, min(n, length))])
    return prompts


@dataclass
class Rollout:
    """What went into one rollout micro-batch: per row its prompt, new tokens, whether it stopped at EOS, and the
    log-prob the sampler gave each new token (kept with replayed rows: ρ then corrects for the older sampler)."""

    example_ids: list[int]
    prompts: list[list[int]]
    tokens: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]]

    def batch(self, pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded prompt + new tokens; labels are the new tokens (EOS included), the prompt is masked; the
        sampler's log-probs aligned with the labels (importance.py)."""
        out = collate([Example(e, p + t, [IGNORE_INDEX] * len(p) + t)
                       for e, p, t in zip(self.example_ids, self.prompts, self.tokens)], pad_id)
        out[SAMPLER_LOGPROBS] = aligned_sampler_logprobs(self.prompts, self.logprobs, out["input_ids"].shape[1])
        return out

    def rows(self) -> list[tuple[int, list[int], list[int], bool, list[float]]]:
        return list(zip(self.example_ids, self.prompts, self.tokens, self.finished, self.logprobs))

    @classmethod
    def of_rows(cls, rows: list[tuple[int, list[int], list[int], bool, list[float]]]) -> "Rollout":
        ids, prompts, tokens, finished, logprobs = (list(x) for x in zip(*rows))
        return cls(ids, prompts, tokens, finished, logprobs)


def roll_out(student, batch: dict, settings: SamplingSettings, *, eos_ids: list[int], pad_id: int, bos_id: int | None,
             prompt_tokens: int, seed: int, autocast) -> Rollout:
    """One batched, no-grad ``sample`` call on the (unwrapped) student in eval mode, under its autocast."""
    prompts = prompts_of(batch, bos_id, prompt_tokens)
    was_training = student.training
    student.eval()
    try:
        with autocast:
            out: Completions = sample(student, prompts, settings, eos_ids=eos_ids, pad_id=pad_id, seed=seed)
    finally:
        student.train(was_training)
    return Rollout(batch["example_id"].tolist(), prompts, out.tokens, out.finished, out.logprobs)


@dataclass
class RolloutStats:
    """Sums over a step's rollout rows (reduced over ranks before they become metrics)."""

    rows: int = 0
    new_tokens: int = 0
    eos: int = 0
    truncated: int = 0

    def add(self, rollout: Rollout, max_new_tokens: int) -> None:
        self.rows += len(rollout.tokens)
        self.new_tokens += sum(len(t) for t in rollout.tokens)
        self.eos += sum(rollout.finished)
        self.truncated += sum(not f and len(t) == max_new_tokens for t, f in zip(rollout.tokens, rollout.finished))

    def tensor(self) -> torch.Tensor:
        return torch.tensor([self.rows, self.new_tokens, self.eos, self.truncated], dtype=torch.float64)

    @staticmethod
    def metrics(reduced: torch.Tensor) -> dict[str, float]:
        rows, new_tokens, eos, truncated = reduced.tolist()
        rows = max(rows, 1)
        return {"rollout/gen_length": new_tokens / rows, "rollout/eos_rate": eos / rows,
                "rollout/truncation_rate": truncated / rows}
