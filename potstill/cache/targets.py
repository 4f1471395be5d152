"""Cached teacher signals → loss-path targets, looked up by example id (never by step), so shuffling, packing and
gradient accumulation cannot misalign them. Rows are laid out like the student's predicted positions:
(B, T−1) flattened, row b holding example ``batch["example_id"][b]``. Padded positions carry no weight (their
labels are -100), but the loss still runs on them and differentiates through them, so their filler is a valid
teacher distribution (top-k: k distinct ids and a tail, uniform over the k + 1 bins), never a row that would
make a divergence or its gradient infinite (0 · ∞ = NaN survives a zero weight)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from potstill.losses.targets import DenseLogits, Sampled, Target, TopKTail
from potstill.cache.reader import CacheReader
from potstill.cache.format import CacheError, CacheSpec


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


def _pad_rows(rows: list[Tensor], width: int, fill: float | Tensor) -> Tensor:
    """Stack per-example (P_b, ...) tensors into (B, width, ...), padding positions with ``fill`` (a number, or
    one row's worth of values)."""
    fill = torch.as_tensor(fill, dtype=rows[0].dtype)
    out = fill.expand(len(rows), width, *rows[0].shape[1:]).clone()
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def _pad_columns(t: Tensor, width: int) -> Tensor:
    """(P, U) → (P, width) with zeros (sample mode: examples store different numbers of unique ids)."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def batch_target(reader: CacheReader, batch: dict[str, Tensor], vocab: int) -> Target:
    """The cached teacher signal for every predicted position of ``batch`` (on the batch's device)."""
    spec = reader.spec
    if spec.vocab != vocab:
        raise CacheError(f"the cache covers {spec.vocab} vocabulary rows but this run uses {vocab}")
    positions = batch["input_ids"].shape[1] - 1
    lengths = batch["attention_mask"].sum(-1).tolist()
    stored = []
    for example_id, length in zip(batch["example_id"].tolist(), lengths):
        signal = reader.read(int(example_id))
        rows = next(iter(signal.values())).shape[0]
        if rows != length - 1:  # the data changed since the cache was built (max_length, tokenizer, records)
            raise CacheError(f"example {example_id} has {length} tokens here but {rows + 1} in the cache: "
                             "rebuild the cache for this data and data.max_length")
        stored.append(signal)
    device = batch["input_ids"].device
    flat = lambda t: t.reshape(-1, *t.shape[2:]).to(device)  # noqa: E731  (B, P, ...) -> (B·P, ...)
    if spec.mode == "dense":
        return DenseLogits(flat(_pad_rows([s["logprobs"] for s in stored], positions, 0.0)), spec.temperature)
    if spec.mode == "topk":
        pad_ids, pad_logprob, pad_tail = topk_padding(spec.k)
        ids = flat(_pad_rows([s["ids"] for s in stored], positions, pad_ids))
        logprobs = flat(_pad_rows([s["logprobs"] for s in stored], positions, pad_logprob))
        tail = flat(_pad_rows([s["tail_mass"] for s in stored], positions, pad_tail))
        return TopKTail(ids, logprobs, tail, vocab, spec.temperature)
    width = max(s["ids"].shape[-1] for s in stored)
    ids = flat(_pad_rows([_pad_columns(s["ids"], width) for s in stored], positions, 0))
    weights = flat(_pad_rows([_pad_columns(sampled_weights(s, spec), width) for s in stored], positions, 0.0))
    return Sampled(ids, weights, spec.temperature)
