"""Golden metrics: the student's (and teacher's) distance to the *true* next-token distribution of the held-out
text, beside the proxy distance to the teacher. Only the built-in grammar source knows the truth
(``builtin/tokenizer.py::true_token_logprobs``), so golden metrics exist when the held-out data is the built-in
validation split and the tokenizer is the built-in word-level one (each word one token).

``GoldenTable`` is computed once per run: the true log-probs of every held-out example, rows concatenated into one
(R, V) fp32 tensor (row t of an example = the distribution of its token t + 1, i.e. what position t predicts; row 0
= the first word after BOS, its last row = EOS), cut to the example's truncated length. Evaluation asks it, per
batch, for the row index of each scored position (``positions``) and, per chunk, for those rows (``rows``), so
nothing bigger than a chunk × V is ever built beside the table itself. Tokens the source never emits are -inf;
``divergences.kl`` sums only over tokens with true probability > 0.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from potstill.data.encode import Example

log = logging.getLogger("potstill")


def held_out_is_builtin_text(train: str, validation: str | None) -> bool:
    """The held-out data is the built-in grammar's validation split (what ``assemble`` loads for these settings)."""
    return validation == "builtin" or (validation is None and train == "builtin")


class GoldenTable:
    """True next-token log-probs of held-out examples, looked up by example id and position."""

    def __init__(self, logprobs: list[Tensor], example_ids: list[int], device: torch.device | str = "cpu"):
        lengths = [len(lp) for lp in logprobs]
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        self.table = torch.cat(logprobs).to(device)  # (R, V) fp32
        self.start = {eid: s for eid, s in zip(example_ids, starts)}
        self.length = dict(zip(example_ids, lengths))

    @property
    def vocab(self) -> int:
        return self.table.shape[1]

    def positions(self, example_ids: Tensor, valid: Tensor) -> Tensor:
        """(n_valid,) row indices for the scored positions of a batch, in ``valid``'s row-major order (the order of
        ``hidden[:, :-1][valid]``). valid (B, T-1) bool; example_ids (B,)."""
        rows, cols = valid.nonzero(as_tuple=True)  # row-major
        ids = example_ids.cpu().tolist()
        missing = sorted({ids[r] for r in set(rows.tolist())} - set(self.start))
        if missing:
            raise ValueError(f"held-out examples {missing[:5]} have no golden log-probs")
        starts = torch.tensor([self.start.get(i, 0) for i in ids])
        lengths = torch.tensor([self.length.get(i, 0) for i in ids])
        rows, cols = rows.cpu(), cols.cpu()
        if bool((cols >= lengths[rows]).any()):
            raise ValueError("a scored position lies past its example's golden rows (were the examples re-encoded?)")
        return (starts[rows] + cols).to(self.table.device)

    def rows(self, index: Tensor) -> Tensor:
        """(n, V) true log-probs of the given rows."""
        return self.table.index_select(0, index)


def golden_table(tokenizer, examples: list[Example], vocab: int, device: torch.device | str = "cpu",
                 texts: list[str] | None = None) -> GoldenTable | None:
    """The table for held-out examples of the built-in validation split (``texts``[example_id] = its text; default
    the split itself); None, with one log line saying why, when this tokenizer cannot give exact token log-probs."""
    from potstill.builtin import HiddenMarkovSource, builtin_texts, true_token_logprobs

    if texts is None:
        texts = builtin_texts("validation", max(e.example_id for e in examples) + 1)
    source = HiddenMarkovSource.from_seed(0)
    logprobs = []
    for e in examples:
        try:
            truth = true_token_logprobs(tokenizer, source, texts[e.example_id])  # (n_tokens, len(tokenizer))
        except ValueError as exc:
            log.info(f"golden metrics off: this tokenizer does not give exact built-in token log-probs ({exc})")
            return None
        full_ids = tokenizer(texts[e.example_id])["input_ids"] + [tokenizer.eos_token_id]
        if full_ids[: len(e.input_ids)] != e.input_ids or truth.shape[1] != vocab:
            log.info("golden metrics off: the held-out tokens or vocabulary differ from the built-in source's")
            return None
        logprobs.append(truth[: len(e.input_ids) - 1])  # position t predicts token t + 1
    return GoldenTable(logprobs, [e.example_id for e in examples], device)


def golden_for_run(train: str, validation: str | None, tokenizer, examples: list[Example], vocab: int,
                   device: torch.device | str = "cpu") -> GoldenTable | None:
    """The golden table when the run's held-out data is the built-in validation split, else None."""
    if not examples or not held_out_is_builtin_text(train, validation):
        return None
    return golden_table(tokenizer, examples, vocab, device)

