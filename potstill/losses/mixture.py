"""Several teachers as ONE dense teacher target: p_mix(v) = Σ_k w_k · p_k(v) per position, mixed in probability
space (log p_mix = logsumexp_k(log w_k + log p_k)), chunk by chunk.

Each teacher's chunk becomes log-probs at the objective's temperature through the loss path's own
``teacher_logprobs`` (temperature division or a cache's pre-tempered log-probs via ``logits_divisor``, the
MIN_TEACHER_LOGP floor); the mixture is then handed over as log-probs *already at that temperature*
(``temperature`` = the objective's T, so the loss path does not divide again). T², masking and the divergences stay
in ``chunked.py``. Peak extra memory is the running mixture plus one teacher's chunk: O(chunk × V), never B·T·V.

Components must be dense (a live teacher's ``TeacherHidden`` or a dense cache's ``DenseLogits``): the top-k bins of
two teachers hold different ids, and p_k of an id outside teacher k's top k is unknown (only its tail's total), so
their mixture cannot be formed exactly; such caches are refused when the teachers are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from potstill.losses.chunked import teacher_logprobs
from potstill.losses.targets import DenseLogits, TeacherHidden, logits_divisor

DENSE_COMPONENTS = (DenseLogits, TeacherHidden)


def dense_logprobs(component, sl: slice, vocab: int, temperature: float) -> Tensor:
    """One dense teacher's log-probs (n, vocab) at ``temperature`` for positions ``sl``, floored like every teacher's."""
    return teacher_logprobs(component.chunk_logits(sl)[:, :vocab], logits_divisor(component, temperature))


@dataclass
class Mixture:
    """components: one dense target per teacher (None = a teacher with weight 0 at every position of the batch,
    never evaluated); log_weights (N, K): log w_k per position (rows sum to 1 in probability; −inf = weight 0);
    vocab: the run's V; temperature: the objective's T, at which every component is taken and the mixture given."""

    components: list
    log_weights: Tensor
    vocab: int
    temperature: float

    def __post_init__(self):
        if len(self.components) != self.log_weights.shape[-1]:
            raise ValueError(f"{len(self.components)} teachers but {self.log_weights.shape[-1]} weight columns")
        for k, c in enumerate(self.components):
            if c is not None and not isinstance(c, DENSE_COMPONENTS):
                raise ValueError(f"teacher {k} of a mixture is a {type(c).__name__}: mixing needs dense teachers")
        if all(c is None for c in self.components):
            raise ValueError("a mixture needs at least one teacher with weight > 0")

    @torch.no_grad()
    def chunk_logits(self, sl: slice) -> Tensor:
        """log p_mix (n, V) for positions ``sl``: a running logaddexp over the teachers in use."""
        mixed = None
        for k, c in enumerate(self.components):
            if c is None:
                continue
            part = dense_logprobs(c, sl, self.vocab, self.temperature) + self.log_weights[sl, k : k + 1]
            mixed = part if mixed is None else torch.logaddexp(mixed, part)
        return mixed
