"""Deterministic, resumable batching: a seeded permutation per epoch and a position inside it.

The whole data position is two integers (epoch, index), saved in every checkpoint, so a resumed run sees
exactly the batches an uninterrupted run would have seen. With several data-parallel ranks the permutation and the
position are global: each micro-batch takes ``batch_size × world_size`` consecutive examples of the permutation and
rank r keeps its slice of ``batch_size``, so the position means the same on any rank count (a run resumes on
another number of ranks with the same global batch and sees the same examples).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from potstill.data.encode import Example
from potstill.data.packing import packed_collate
from potstill.labels import IGNORE_INDEX


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) input_ids / attention_mask / labels, plus example_id (B,) for cache lookups."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "example_id": torch.tensor([e.example_id for e in examples]), **collate_extra(examples)}


def collate_extra(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Each ``Example.extra`` list as a (B, longest) int64 tensor padded with -1 (cross-tokenizer alignment)."""
    out = {}
    for key in examples[0].extra:
        rows = [e.extra[key] for e in examples]
        tensor = torch.full((len(rows), max(len(r) for r in rows)), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            tensor[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        out[key] = tensor
    return out


@dataclass
class Batcher:
    examples: list[Example]
    batch_size: int
    seed: int
    pad_id: int
    pack_length: int = 0  # > 0: each batch's examples are packed into rows of at most this many tokens (packing.py)
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    index: int = 0

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's part of the next global micro-batch; an epoch's short tail is skipped so every rank's batch
        has ``batch_size`` examples."""
        global_size = self.batch_size * self.world_size
        if global_size > len(self.examples):
            ranks = f" × {self.world_size} ranks" if self.world_size > 1 else ""
            raise ValueError(f"train.batch_size {self.batch_size}{ranks} exceeds the {len(self.examples)} training examples")
        if self.index + global_size > len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index + self.rank * self.batch_size
        chosen = [self.examples[i] for i in self._order()[start : start + self.batch_size]]
        self.index += global_size
        if self.pack_length:
            return packed_collate(chosen, self.pad_id, self.pack_length)
        return collate(chosen, self.pad_id)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Held-out batches in a fixed order, sorted by length so padding stays small."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
