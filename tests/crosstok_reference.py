"""What every naive cross-tokenizer reference shares, written from the definitions: the label CE term over labelled
positions, and the student's and teacher's distributions at T on the labelled aligned positions."""
from __future__ import annotations

import torch.nn.functional as F


def ce_and_aligned_rows(hidden, weight, labels, target, temperature: float, ce: float):
    """(ce · Σ −log q(y) over labelled positions, [(i, q_i, p_i)] at labelled aligned positions), q and p at T."""
    z, teacher = hidden @ weight.T, target.rows.logits
    total, rows = 0.0, []
    for i, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        total = total + ce * -F.log_softmax(z[i], -1)[y]
        if target.aligned[i]:
            rows.append((i, F.softmax(z[i] / temperature, -1), F.softmax(teacher[i] / temperature, -1)))
    return total, rows
