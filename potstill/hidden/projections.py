"""Trainable student → teacher width projections, one per layer pair.

They live inside the student's forward seam (``hidden.seam.HiddenKDSeam``), so the optimizer, DDP's gradient
reduction and the name-keyed optimizer state see them like any student parameter, while the exported HF model never
contains them: they are saved beside it as safetensors.
"""
from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

FILE_NAME = "hidden_projections.safetensors"


def build_projection(kind: str, student_width: int, teacher_width: int) -> nn.Module:
    """``linear``: W (teacher_width × student_width), no bias, PyTorch's default init. ``orthogonal``: the same
    shape kept semi-orthogonal by torch's parametrization (orthonormal columns when the teacher is wider,
    WᵀW = I; orthonormal rows when it is narrower, WWᵀ = I). ``none``: identity (equal widths only)."""
    if kind == "none":
        if student_width != teacher_width:
            raise ValueError(f"hidden.projection=none needs equal widths, but the student's hidden size is "
                             f"{student_width} and the teacher's {teacher_width}; use linear or orthogonal")
        return nn.Identity()
    linear = nn.Linear(student_width, teacher_width, bias=False)
    # matrix_exp for every shape: torch's default for non-square matrices (householder) reads the signs of the
    # original's diagonal through int(), so AdamW's weight decay (1 → 0.9995 → int 0) turns the matrix into zeros
    return orthogonal(linear, orthogonal_map="matrix_exp") if kind == "orthogonal" else linear


class Projections(nn.Module):
    """One projection per layer pair; ``forward(i, h)`` maps the student's states of pair i to the teacher's width."""

    def __init__(self, kind: str, n_pairs: int, student_width: int, teacher_width: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # a private init stream: the run's RNG is left as it was
            torch.manual_seed(seed)
            self.pairs = nn.ModuleList(build_projection(kind, student_width, teacher_width) for _ in range(n_pairs))

    def forward(self, i: int, h: Tensor) -> Tensor:
        return self.pairs[i](h)

    def matrices(self) -> dict[str, Tensor]:
        """The effective weight each pair applies (orthogonal ones evaluated), for export."""
        return {f"pairs.{i}.weight": p.weight.detach().contiguous().cpu()
                for i, p in enumerate(self.pairs) if not isinstance(p, nn.Identity)}

    def to_bytes(self, layer_map: list[tuple[int, int]]) -> bytes:
        """The effective matrices as safetensors, with the layer map in the metadata."""
        meta = {"layer_map": repr([list(pair) for pair in layer_map])}
        return save_safetensors(self.matrices(), metadata=meta)


def load_matrices(data: bytes) -> dict[str, Tensor]:
    return load_safetensors(data)
