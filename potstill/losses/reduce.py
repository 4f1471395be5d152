"""Normalisation, in one place: leaf losses are sums; a step divides by the *global* count of valid tokens
(all micro-batches of the step, all data-parallel ranks), so gradient accumulation and data parallelism give
exactly the gradient of the full batch's token mean."""
from __future__ import annotations

from typing import Iterable

import torch

from potstill.labels import IGNORE_INDEX


def count_valid_tokens(label_batches: Iterable[torch.Tensor], all_reduce=lambda x: x) -> int:
    """Labelled positions over every micro-batch of one optimiser step, summed over ranks by ``all_reduce``."""
    local = sum(int((labels != IGNORE_INDEX).sum()) for labels in label_batches)
    return int(all_reduce(torch.tensor(float(local))).item())


def normalise(loss_sum: torch.Tensor, global_count: int) -> torch.Tensor:
    """A masked sum divided by the global token count; a step with no labelled token gives exactly 0."""
    return loss_sum / max(global_count, 1)
