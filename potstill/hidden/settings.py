"""The `hidden` config section (hidden-state KD) and its config-time checks, one line each.

Checks that need the models (layer indices against the models' layer counts, widths, attention modules) run when
the models are loaded (``hidden.kd.build``), still before anything is written."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

OBJECTIVES = ("mse", "cosine")
PROJECTIONS = ("linear", "orthogonal", "none")
QKV = ("q", "k", "v")


@dataclass
class AttentionRelationsConfig:
    weight: float = 0.0
    """MiniLM(v2) self-attention relation KD: weight of the term (0 = off). For the chosen layer pair, the student's and the teacher's query, key and value projections are split into `heads` relation heads; per head, softmax(x·xᵀ/√d) over the causally visible keys is compared by KL(teacher‖student), averaged over heads and relations, summed over labelled positions."""
    heads: int = 1
    """Relation heads: the q/k/v projection outputs of both models are split into this many equal parts (it must divide each of their widths); independent of either model's attention heads, so models with different head counts can be paired."""
    layers: list | None = None
    """The decoder block pair [student, teacher] whose attention projections are compared, 1-based (1 = first block); null = the last block of each."""
    relations: list = field(default_factory=lambda: ["q", "k", "v"])
    """Which self-relations: any of q (Q·Qᵀ), k (K·Kᵀ), v (V·Vᵀ)."""


@dataclass
class HiddenConfig:
    weight: float = 0.0
    """Hidden-state KD: weight of the term (0 = off), added to the logit objective in one sum normalised by the labelled-token count. Per layer pair, the student's states are projected to the teacher's width and compared per labelled position (`hidden.objective`), averaged over pairs. Needs a live teacher (teacher.path): a cache or server holds no hidden states (docs/hidden-state.md)."""
    objective: str = "mse"
    """Per-position comparison: `mse` (mean over features of the squared difference) or `cosine` (1 − cos)."""
    layers: str | list = "uniform"
    """Layer pairs by hidden-state index (0 = embeddings, i = output of block i, L = the final normed state the head reads): `uniform` = `hidden.pairs` pairs (k·L_student/N, k·L_teacher/N) for k = 1..N, rounded down, so the last layers always pair; or explicit pairs [[student, teacher], ...]."""
    pairs: int = 0
    """With `layers: uniform`: the number of pairs N (0 = the smaller model's block count; at most that)."""
    projection: str = "linear"
    """Student → teacher width, one per pair, trained with the student and saved beside it (final/potstill/hidden_projections.safetensors, not in the exported model): `linear` (no bias), `orthogonal` (V_kD: a semi-orthogonal matrix; wider teacher: WᵀW = I, an isometry; narrower teacher: WWᵀ = I, an orthogonal projection) or `none` (identity; equal widths only)."""
    seed: int = 0
    """Seed of the projections' initialisation (a private generator: the run's RNG stream is untouched)."""
    attention_relations: AttentionRelationsConfig = field(default_factory=AttentionRelationsConfig)


def enabled(cfg) -> bool:
    """Whether the run distils hidden states or attention relations."""
    return cfg.hidden.weight > 0 or cfg.hidden.attention_relations.weight > 0


def _check_weight(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{key} must be a finite number ≥ 0 (0 = off), got {value}")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_layers(layers) -> None:
    """`uniform` or a non-empty list of [student, teacher] pairs of non-negative integers."""
    if layers == "uniform":
        return
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"hidden.layers={layers!r}: use uniform or a list of [student, teacher] pairs, e.g. [[1, 2], [2, 4]]")
    for i, pair in enumerate(layers):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_index(x) for x in pair)):
            raise ValueError(f"hidden.layers pair {i} {pair!r}: expected [student, teacher], two integers ≥ 0")


def _check_relations(cfg) -> None:
    r = cfg.hidden.attention_relations
    _check_weight("hidden.attention_relations.weight", r.weight)
    if r.heads < 1:
        raise ValueError(f"hidden.attention_relations.heads must be ≥ 1, got {r.heads}")
    if r.layers is not None and not (isinstance(r.layers, list) and len(r.layers) == 2
                                     and all(_is_index(x) and x >= 1 for x in r.layers)):
        raise ValueError(f"hidden.attention_relations.layers={r.layers!r}: expected [student, teacher] block numbers "
                         "≥ 1 (1 = first block), or null for the last blocks")
    if not r.relations or any(x not in QKV for x in r.relations) or len(set(r.relations)) != len(r.relations):
        raise ValueError(f"hidden.attention_relations.relations={r.relations!r}: a non-empty list of distinct q, k, v")
    if r.weight > 0 and cfg.data.packing:
        raise ValueError("hidden.attention_relations with data.packing: relations would span packed documents; "
                         "set data.packing=false")


def check_settings(cfg) -> None:
    h = cfg.hidden
    _check_weight("hidden.weight", h.weight)
    if h.objective not in OBJECTIVES:
        raise ValueError(f"hidden.objective={h.objective!r}: use mse or cosine")
    if h.projection not in PROJECTIONS:
        raise ValueError(f"hidden.projection={h.projection!r}: use linear, orthogonal or none")
    check_layers(h.layers)
    if h.pairs < 0:
        raise ValueError(f"hidden.pairs must be ≥ 0 (0 = the smaller model's block count), got {h.pairs}")
    if h.pairs and h.layers != "uniform":
        raise ValueError("hidden.pairs counts uniform pairs: it does not apply to explicit hidden.layers")
    _check_relations(cfg)
    if not enabled(cfg):
        return
    t = cfg.teacher
    if t.cache or t.server_url:
        raise ValueError(f"hidden.* needs the teacher's hidden states, which {'teacher.cache' if t.cache else 'teacher.server_url'} "
                         "does not hold: use a live teacher (teacher.path)")
    if not t.path:
        raise ValueError("hidden.* distils a teacher's hidden states: set teacher.path")
    if cfg.parallel.strategy == "fsdp":
        raise ValueError("hidden.* with parallel.strategy=fsdp is not supported yet (the projections would be sharded "
                         "into the exported model's state); use parallel.strategy=ddp")
