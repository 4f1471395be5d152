"""Measuring a distilled sentence encoder against its teacher: agreement on given texts, size and speed
(used by examples/minilm_embedding and its test). Sentences for an offline run come from the built-in grammar."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from potstill.encoders import evaluation


def builtin_sentences(split: str, n: int) -> list[str]:
    """The first ``n`` sentences of the built-in grammar's ``split`` documents (deterministic, offline)."""
    from potstill.builtin import builtin_texts

    sentences: list[str] = []
    count = max(8, n // 4)
    while len(sentences) < n:
        sentences = [s.strip() + " ." for doc in builtin_texts(split, count) for s in doc.split(" . ") if s.strip(" .")]
        count *= 2
    return sentences[:n]


def text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int = 128) -> list[dict]:
    """Right-padded tokenised batches in the given order."""
    return [dict(tokenizer(texts[i: i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def agreement(student, teacher, batches: list[dict]) -> dict[str, float]:
    """Cosine agreement and similarity-structure Spearman (encoders/evaluation.py) on these batches."""
    return evaluation.embedding_metrics(student, teacher, batches)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_bytes(model_dir: str | Path) -> int:
    """Bytes of a saved model's weight files."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


@torch.no_grad()
def sentences_per_second(models: list, batches: list[dict], repeats: int = 5, threads: int = 1) -> list[float]:
    """Encoding throughput of each model (eval mode, ``threads`` torch threads) on the same batches: the best of
    ``repeats`` passes each, after one warm-up pass, the models' passes interleaved so that a busy machine slows
    them alike."""
    from potstill.encoders.seam import sentence_embeddings

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        n = sum(len(b["input_ids"]) for b in batches)
        best = [float("inf")] * len(models)
        for i in range(repeats + 1):
            for k, model in enumerate(models):
                start = time.perf_counter()
                for b in batches:
                    sentence_embeddings(model, b["input_ids"], b["attention_mask"])
                if i:  # the first pass warms up
                    best[k] = min(best[k], time.perf_counter() - start)
        return [n / t for t in best]
    finally:
        torch.set_num_threads(previous)
        for m, mode in zip(models, modes):
            m.train(mode)
