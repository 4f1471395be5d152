"""Cached teacher signals → loss-path targets, looked up by example id (never by step), so shuffling, packing and
gradient accumulation cannot misalign them. Rows are laid out like the student's predicted positions:
(R, T−1) flattened. Each example's cached rows (one per predicted position, length − 1 of them) go where its
segment starts (``data.packing.segment_table``): in a padded batch example b fills row b from position 0; in a
packed batch several examples share a row. Positions without a cached row — padding, and in a packed row each
document's last position, which would predict the next document's first token — carry no weight (their labels
are -100), but the loss still runs on them and differentiates through them, so their filler is a valid teacher
distribution (top-k: k distinct ids and a tail, uniform over the k + 1 bins), never a row that would make a
divergence or its gradient infinite (0 · ∞ = NaN survives a zero weight)."""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from potstill.losses.targets import DenseLogits, Sampled, Target, TopKTail
from potstill.cache.reader import CacheReader
from potstill.cache.format import CacheError, CacheSpec
from potstill.data.packing import segment_table


def sampled_weights(stored: dict[str, Tensor], spec: CacheSpec) -> Tensor:
    """(P, U) estimator weights: count/K, times p/r when the proposal r was tempered differently from p."""
    weights = stored["counts"] / spec.samples
    if spec.importance_weighted:
        weights = weights * stored["log_ratio"].exp()  # p/r, stored as an fp32 log computed in float64
    return weights


def topk_padding(k: int) -> tuple[Tensor, float, float]:
    """The filler of a padded top-k position: ids 0..k−1 (distinct) with log-prob log 1/(k+1) each and tail mass
    1/(k+1) — the uniform distribution over the k + 1 bins, a valid teacher for every divergence."""
    uniform = 1.0 / (k + 1)
    return torch.arange(k), math.log(uniform), uniform


def _place(values: list[Tensor], starts: list[tuple[int, int]], shape: tuple[int, int], fill: float | Tensor) -> Tensor:
    """Per-example (P_b, ...) tensors placed at (row, start) of a (rows, width, ...) tensor; every other position
    holds ``fill`` (a number, or one position's worth of values)."""
    fill = torch.as_tensor(fill, dtype=values[0].dtype)
    out = fill.expand(*shape, *values[0].shape[1:]).clone()
    for (row, start), v in zip(starts, values):
        out[row, start : start + v.shape[0]] = v
    return out


def _pad_columns(t: Tensor, width: int) -> Tensor:
    """(P, U) → (P, width) with zeros (sample mode: examples store different numbers of unique ids)."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def batch_target(reader: CacheReader, batch: dict[str, Tensor], vocab: int) -> Target:
    """The cached teacher signal for every predicted position of ``batch`` (on the batch's device)."""
    spec = reader.spec
    if spec.vocab != vocab:
        raise CacheError(f"the cache covers {spec.vocab} vocabulary rows but this run uses {vocab}")
    shape = (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)  # the predicted positions
    segments = segment_table(batch).tolist()
    stored = []
    for example_id, (_, _, length) in zip(batch["example_id"].tolist(), segments):
        signal = reader.read(int(example_id))
        rows = next(iter(signal.values())).shape[0]
        if rows != length - 1:  # the data changed since the cache was built (max_length, tokenizer, records)
            raise CacheError(f"example {example_id} has {length} tokens here but {rows + 1} in the cache: "
                             "rebuild the cache for this data and data.max_length")
        stored.append(signal)
    lay = functools.partial(_place, starts=[(row, start) for row, start, _ in segments], shape=shape)
    device = batch["input_ids"].device
    flat = lambda t: t.reshape(-1, *t.shape[2:]).to(device)  # noqa: E731  (R, P, ...) -> (R·P, ...)
    if spec.mode == "dense":
        return DenseLogits(flat(lay([s["logprobs"] for s in stored], fill=0.0)), spec.temperature)
    if spec.mode == "topk":
        pad_ids, pad_logprob, pad_tail = topk_padding(spec.k)
        ids = flat(lay([s["ids"] for s in stored], fill=pad_ids))
        logprobs = flat(lay([s["logprobs"] for s in stored], fill=pad_logprob))
        tail = flat(lay([s["tail_mass"] for s in stored], fill=pad_tail))
        return TopKTail(ids, logprobs, tail, vocab, spec.temperature)
    width = max(s["ids"].shape[-1] for s in stored)
    ids = flat(lay([_pad_columns(s["ids"], width) for s in stored], fill=0))
    weights = flat(lay([_pad_columns(sampled_weights(s, spec), width) for s in stored], fill=0.0))
    return Sampled(ids, weights, spec.temperature)
