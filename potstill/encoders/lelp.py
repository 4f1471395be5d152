"""LELP (Learning Embedding Linear Projections; Loo, Iliopoulos, Hu, Vee 2024) for binary and few-class tasks.

A teacher of C classes tells the student little per example (C − 1 numbers). LELP finds informative linear
directions in the teacher's final embedding space and splits each class into S pseudo-subclasses along them; the
student gets a C·S-way head and is distilled to the teacher's pseudo-subclass distribution. As implemented here:

1. Subclass directions (``fit``). The teacher's pooled vectors h (the head's input) of the training texts are
   projected onto the null space of the teacher's head W (C, H) — the directions the class logits do not read,
   P = I − Q Qᵀ with Q an orthonormal basis of the span of W's rows — and grouped by the record's class. Per class c the top-S
   principal components of the (centred) projected vectors give directions v_{c,1..S} and their standard
   deviations σ_{c,s}; each direction's sign is fixed (its largest-magnitude entry positive) so a fit is
   reproducible.
2. Teacher pseudo-subclass logits (``subclass_logits``): u_{c,s} = v_{c,s}·(P h − μ_c) / σ_{c,s} (standardised
   coordinate along the direction) and z_{c,s} = z_c + log softmax_s(u_{c,·}), z_c = w_c·h + b_c the teacher's class
   logit. So Σ_s p(c, s) = p_T(c) exactly: the class distribution is the teacher's, the split within a class is where
   the text lies along that class's principal directions.
3. The student's head (``widen_head``) becomes C·S rows, row c·S + s initialised to the class row w_c (bias b_c), so
   before training its class distribution is unchanged (each class logit gains log S).
4. Predictions map back to classes by summing subclass probabilities (``class_logprobs``: log-sum-exp of each
   class's S logits).
5. The fitted split is exported beside the student (``FILE_NAME`` in final/potstill/): row c·S + s of the student's
   head was trained against direction v_{c,s}, so evaluating or continuing from that student reloads this split
   rather than refitting one (a refit on other data, device or dtype may order or orient the directions otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

FILE_NAME = "lelp_subclasses.safetensors"  # under a student's potstill/ folder (train.py's final/ export)
_SPAN_TOLERANCE = 1e-2  # relative residual of a head outside a split's row space: bf16 rounding passes, others not
_FIELDS = ("directions", "means", "stds", "q")  # Subclasses' tensors, in order (the export's tensor names)


@dataclass
class Subclasses:
    """A fitted LELP split: per class c, directions (C, S, H), means (C, H) and standard deviations (C, S) in the
    null space of the teacher's head (basis ``q`` (H, r) of the head's row space)."""
    directions: Tensor
    means: Tensor
    stds: Tensor
    q: Tensor

    @property
    def per_class(self) -> int:
        return self.directions.shape[1]

    def null_projection(self, h: Tensor) -> Tensor:
        """P h: h without its component in the span of the teacher head's rows."""
        return h - (h @ self.q) @ self.q.T

    def subclass_logits(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The teacher's pseudo-subclass logits (N, C·S) from its pooled vectors h (N, H) and head (C, H)."""
        h = h.float()
        z = h @ weight.float().T + (0 if bias is None else bias.float())  # (N, C)
        centred = self.null_projection(h)[:, None, :] - self.means[None]  # (N, C, H)
        u = torch.einsum("nch,csh->ncs", centred, self.directions) / self.stds[None]
        return (z[:, :, None] + torch.log_softmax(u, dim=-1)).reshape(h.shape[0], -1)

    def to(self, device) -> "Subclasses":
        return Subclasses(*(getattr(self, name).to(device) for name in _FIELDS))

    def to_bytes(self) -> bytes:
        return save_safetensors({name: getattr(self, name).detach().float().contiguous().cpu() for name in _FIELDS})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Subclasses":
        tensors = load_safetensors(data)
        return cls(*(tensors[name] for name in _FIELDS))

    def fits(self, weight: Tensor, per_class: int) -> bool:
        """Whether this split was fitted for a head ``weight`` (C, H) with ``per_class`` subclasses: the shapes agree
        and the head's rows lie in the split's row-space basis (another teacher's head does not)."""
        classes, width = weight.shape
        if self.directions.shape != (classes, per_class, width) or self.q.shape[0] != width:
            return False
        w = weight.detach().float().to(self.q.device)
        return float((w - (w @ self.q) @ self.q.T).norm()) <= _SPAN_TOLERANCE * float(w.norm())


def _fixed_signs(v: Tensor) -> Tensor:
    """Each row (a direction) flipped so that its largest-magnitude entry is positive."""
    pivot = v.gather(1, v.abs().argmax(1, keepdim=True))
    return v * torch.where(pivot < 0, -1.0, 1.0)


def row_space(weight: Tensor) -> Tensor:
    """An orthonormal basis (H, r) of the span of the head's rows; r < C when rows are dependent (e.g. a binary head
    with w_1 = −w_0), where a QR basis would carry an arbitrary extra column."""
    _, s, vt = torch.linalg.svd(weight, full_matrices=False)
    return vt[s > s[0] * max(weight.shape) * torch.finfo(weight.dtype).eps].T


def fit(h: Tensor, labels: Tensor, weight: Tensor, per_class: int) -> Subclasses:
    """Subclass directions from the teacher's pooled vectors h (N, H) of the training texts, their classes (N,) and
    the teacher's head (C, H). Every class needs more than ``per_class`` texts (a rank-S split of its vectors)."""
    h, weight = h.double(), weight.double()  # fp64: the principal directions of near-degenerate spectra are stable
    classes = weight.shape[0]
    q = row_space(weight)
    projected = h - (h @ q) @ q.T
    dirs, means, stds = [], [], []
    for c in range(classes):
        xc = projected[labels == c]
        if xc.shape[0] <= per_class:
            raise ValueError(f"task.lelp_subclasses={per_class}: class {c} has {xc.shape[0]} training texts; LELP "
                             f"needs more than {per_class} per class (lower task.lelp_subclasses or add data)")
        mu = xc.mean(0)
        _, s, vt = torch.linalg.svd(xc - mu, full_matrices=False)
        std = s[:per_class] / (xc.shape[0] - 1) ** 0.5
        if not bool((std > 1e-9 * max(float(s[0]), 1e-30)).all()):
            raise ValueError(f"task.lelp_subclasses={per_class}: class {c}'s teacher vectors span fewer than "
                             f"{per_class} directions outside the head; lower task.lelp_subclasses")
        dirs.append(_fixed_signs(vt[:per_class]))
        means.append(mu)
        stds.append(std)
    return Subclasses(torch.stack(dirs).float(), torch.stack(means).float(), torch.stack(stds).float(), q.float())


def class_logprobs(subclass_logits: Tensor, per_class: int) -> Tensor:
    """Class log-probabilities (N, C) from pseudo-subclass logits (N, C·S): log Σ_s p(c, s)."""
    n = subclass_logits.shape[0]
    grouped = torch.logsumexp(subclass_logits.float().reshape(n, -1, per_class), dim=-1)
    return torch.log_softmax(grouped, dim=-1)


def subclass_names(names: dict, classes: int, per_class: int) -> dict[int, str]:
    """The id2label of a widened head: row c·S + s is ``CLASS/s`` (CLASS = names[c], or c when unnamed)."""
    return {c * per_class + s: f"{names.get(c, c)}/{s}" for c in range(classes) for s in range(per_class)}


def is_subclass_head(id2label: dict, classes: int, per_class: int) -> bool:
    """Whether ``id2label`` is what ``subclass_names`` writes for ``classes`` × ``per_class`` (an exported LELP
    head): row c·S + s named ``CLASS/s``, one CLASS per class."""
    labels = [str(id2label[i]) if i in id2label else None for i in range(classes * per_class)]
    if len(id2label) != len(labels) or None in labels:
        return False
    prefixes = {c: label.rpartition("/")[0] for c, label in enumerate(labels[::per_class])}
    return labels == list(subclass_names(prefixes, classes, per_class).values())


@torch.no_grad()
def widen_head(head: nn.Linear, per_class: int) -> nn.Linear:
    """A C·S-row head whose row c·S + s (and bias) is a copy of class c's."""
    wide = nn.Linear(head.in_features, head.out_features * per_class, bias=head.bias is not None,
                     device=head.weight.device, dtype=head.weight.dtype)
    wide.weight.copy_(head.weight.repeat_interleave(per_class, dim=0))
    if head.bias is not None:
        wide.bias.copy_(head.bias.repeat_interleave(per_class))
    return wide


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits in ``model`` (by identity)."""
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(model).__name__}")
