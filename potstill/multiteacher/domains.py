"""Domains of examples and per-domain held-out CE, what DDK weighting (teachers.mix=ddk) reads.

A record's domain is its ``domain`` field when it has one, else its kind (text, prompt/completion, messages): on
``builtin:mixed`` that separates the arithmetic problems from the grammar texts without extra fields."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.data.loading import Record, record_kind, record_location
from potstill.evaluate import _eval_mode
from potstill.labels import IGNORE_INDEX
from potstill.losses.chunked import project_chunks
from potstill.losses.divergences import label_logprob
from potstill.models import hidden_states, output_head


def record_domain(record: dict, where: str) -> str:
    domain = record.get("domain")
    if domain is not None and not isinstance(domain, str):
        raise ValueError(f"{where}: 'domain' must be a string, got {type(domain).__name__}")
    return domain or record_kind(record, where)


def domains_by_id(records: list[Record], source: str) -> dict[int, str]:
    return {number: record_domain(rec, record_location(source, number)) for number, rec in records}


@torch.no_grad()
def label_logprobs(model: nn.Module, batch: dict, vocab: int, chunk_size: int = 0) -> Tensor:
    """(B, T−1) the model's log-prob (T = 1) of each next-token label of a padded batch (0 where unlabelled)."""
    h = hidden_states(model, batch["input_ids"], batch.get("attention_mask"))[:, :-1]
    weight, bias = output_head(model, vocab)
    labels = batch["labels"][:, 1:].reshape(-1)
    flat = h.reshape(-1, h.shape[-1])
    out = torch.zeros(labels.shape, device=flat.device)
    for sl, z in project_chunks(flat, weight, bias, chunk_size):
        out[sl] = label_logprob(F.log_softmax(z, -1), labels[sl])
    return torch.where(labels != IGNORE_INDEX, out, 0.0).view(h.shape[:2])


def domain_ce(model: nn.Module, batches: list[dict], domain_of: dict[int, int], n_domains: int, vocab: int) -> Tensor:
    """(D,) mean CE per labelled token of each domain's held-out examples (NaN for a domain without any)."""
    sums = torch.zeros(n_domains, dtype=torch.float64)
    counts = torch.zeros(n_domains, dtype=torch.float64)
    with _eval_mode(model):
        for batch in batches:
            logp = label_logprobs(model, batch, vocab).double().cpu()
            labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).cpu()
            for row, example_id in enumerate(batch["example_id"].tolist()):
                d = domain_of.get(int(example_id))
                if d is not None:
                    sums[d] -= logp[row][labelled[row]].sum()
                    counts[d] += labelled[row].sum()
    return sums / counts
