"""Sequence packing (``data.packing``): a micro-batch's examples laid end to end in as few rows as possible.

The Batcher still picks the same ``train.batch_size`` examples in the same order; packing only changes how they
are laid out, so a packed batch has the same tokens, the same labelled positions and (up to fp32 reassociation)
the same loss sum as the padded one, with less padding computed.

Layout of a packed batch (R rows of width W ≤ ``max_length``):

- ``input_ids`` (R, W): documents end to end, then ``pad_id`` up to W.
- ``position_ids`` (R, W): 0, 1, … restarting at every document, and at the padding tail. transformers builds
  its causal mask from position ids when ``attention_mask`` is None (``masking_utils.find_packed_sequence_indices``:
  a new document starts wherever the position does not grow by one), so no position attends to an earlier
  document. A packed batch therefore has no ``attention_mask``; ``models.hidden_states`` gets the position ids.
- ``labels`` (R, W): each document's labels, except its first token's, which becomes IGNORE_INDEX. Position t
  predicts token t+1, so that label belongs to the previous document's last position; in a padded batch the first
  label of a row is never predicted either, so the labelled positions are exactly the same.
- ``example_id`` (N,) in the Batcher's order, and ``segments`` (N, 3) = (row, start, length) for each of them:
  where the cache (``cache/targets.py``) puts an example's cached rows.
"""
from __future__ import annotations

import torch

from potstill.data.encode import Example
from potstill.labels import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into rows of total length ≤ ``capacity``: longest first, each into the first
    row with room (ties keep their order, so the layout is a function of the batch alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"an example of {lengths[i]} tokens does not fit a packed row of data.max_length={capacity}")
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def packed_collate(examples: list[Example], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """The examples packed into rows of at most ``max_length`` tokens (layout: module docstring); one example per
    row (the padded batch's shape) when packing would compute more positions than padding to the longest."""
    lengths = [len(e.input_ids) for e in examples]
    rows = first_fit_decreasing(lengths, max_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    if len(rows) * width > len(lengths) * max(lengths):  # rows up to max_length can cost more than padding does
        rows, width = [[i] for i in range(len(lengths))], max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.zeros((len(examples), 3), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n, e = lengths[i], examples[i]
            ids[r, start : start + n] = torch.tensor(e.input_ids)
            labels[r, start + 1 : start + n] = torch.tensor(e.labels[1:])
            positions[r, start : start + n] = torch.arange(n)
            segments[i] = torch.tensor([r, start, n])
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding tail: one more "document", never labelled
    return {"input_ids": ids, "position_ids": positions, "labels": labels,
            "example_id": torch.tensor([e.example_id for e in examples]), "segments": segments}


def segment_table(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, 3) rows of (row, start, length), one per example of the batch in ``example_id`` order: a packed batch's
    ``segments``; in a padded batch example b fills row b from position 0."""
    if "segments" in batch:
        return batch["segments"]
    lengths = batch["attention_mask"].sum(-1).cpu()
    rows = torch.arange(len(lengths))
    return torch.stack([rows, torch.zeros_like(rows), lengths], dim=1)


def padding_fraction(batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of the computed positions (rows × width over the micro-batches) that hold no token."""
    positions = sum(b["input_ids"].numel() for b in batches)
    tokens = sum(int(segment_table(b)[:, 2].sum()) for b in batches)
    return 1.0 - tokens / max(positions, 1)
