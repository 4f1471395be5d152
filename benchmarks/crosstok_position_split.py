"""Held-out student CE of trained cross-tokenizer students, split by position kind: ALIGNED positions (they predict
the first token of a chunk, where uld/gold/xproj count) and positions INSIDE a chunk (a word's later BPE pieces,
which only ce and alm train). Built-in word-level teacher's tokenizer against `builtin:bpe`, the first 100 built-in
validation documents.

    python benchmarks/crosstok_position_split.py runs/xtok/ce/final runs/xtok/ce+xproj/final ...
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from potstill.builtin.sources import builtin_texts
from potstill.crosstok.batches import Aligner
from potstill.models import load_causal_lm, load_tokenizer, resolve_model_path


def documents(n: int = 100) -> list[tuple[list[int], list[int]]]:
    """(student ids with EOS, aligned teacher position per student predicted position) per document."""
    student = load_tokenizer("builtin:bpe")
    aligner = Aligner(load_tokenizer(resolve_model_path("builtin")), student)
    out = []
    for text in builtin_texts("validation", n):
        ids = student(text)["input_ids"] + [student.eos_token_id]
        out.append((ids, aligner({"text": text}, ids, list(ids), "doc")["xtok_positions"]))
    return out


def split_ce(path: str, docs) -> dict[bool, tuple[float, int]]:
    model = load_causal_lm(path).eval()
    sums = {True: [0.0, 0], False: [0.0, 0]}
    for ids, positions in docs:
        with torch.no_grad():
            logq = F.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        nll = -logq.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        for i, j in enumerate(positions):
            sums[j >= 0][0] += float(nll[i])
            sums[j >= 0][1] += 1
    return {k: (v[0] / v[1], v[1]) for k, v in sums.items()}


def main() -> None:
    torch.set_num_threads(1)
    docs = documents()
    for path in sys.argv[1:]:
        ce = split_ce(path, docs)
        print(f"{path}: aligned {ce[True][0]:.4f} nats/token ({ce[True][1]} positions), "
              f"inside a chunk {ce[False][0]:.4f} ({ce[False][1]})", flush=True)


if __name__ == "__main__":
    main()
