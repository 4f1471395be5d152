"""Hidden-state KD in the one loop: what a run with `hidden.*` builds (layer map, projections, attention sites),
the seams it gives ``runtime.parallelize``, the loss sums it adds to the fused loss's total, its metrics and its
checkpoint state.

Terms (both sums over the labelled positions, so the loop's division by the global labelled-token count makes
them per-token means like the logit objective's):
  hidden.weight · (1/P) Σ_pairs Σ_positions objective(proj_p(h_student[s_p]), h_teacher[t_p])
  hidden.attention_relations.weight · (1/(R·|relations|)) Σ_{relation, head} Σ_rows KL(A_teacher ‖ A_student)
with A = softmax(x·xᵀ/√d) over the causally visible, attended positions (MiniLMv2's self-attention relations).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from potstill.hidden.layers import (AttentionSite, attention_site, block_count, check_relation_heads,
                                    default_relation_blocks, resolve_layer_map, width)
from potstill.hidden.projections import FILE_NAME, Projections
from potstill.hidden.seam import HiddenKDSeam
from potstill.hidden.settings import HiddenConfig, enabled
from potstill.labels import IGNORE_INDEX
from potstill.losses import hidden as losses
from potstill.models import HiddenAndHead

METRIC_NAMES = ("hidden/states", "hidden/attention_relations")  # token means of the two unweighted sums


@dataclass
class HiddenKD:
    settings: HiddenConfig
    layer_map: list[tuple[int, int]]  # (student, teacher) hidden-state indices; empty when hidden.weight = 0
    projections: Projections | None
    student_site: AttentionSite | None = None  # q/k/v modules for attention relations
    teacher_site: AttentionSite | None = None
    sums: Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))  # this step's, for metrics

    def make_seam(self, model: nn.Module, vocab: int, role: str) -> nn.Module:
        """The forward seam for ``role`` (student, teacher or reference) that ``runtime.parallelize`` wraps."""
        if role == "student":
            return HiddenKDSeam(model, vocab, [s for s, _ in self.layer_map], self.projections, self.student_site)
        if role == "teacher":
            return HiddenKDSeam(model, vocab, [t for _, t in self.layer_map], None, self.teacher_site)
        return HiddenAndHead(model, vocab)

    def loss_sum(self, student_extra: tuple, teacher_extra: tuple, batch: dict) -> Tensor:
        """The weighted sum of both terms over this micro-batch's labelled positions (fp32, outside autocast)."""
        (s_states, s_qkv), (t_states, t_qkv) = student_extra, teacher_extra
        rows = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1): the positions the logit loss counts
        states_sum = relations_sum = torch.zeros((), device=rows.device)
        if s_states:
            fn = losses.mse if self.settings.objective == "mse" else losses.cosine
            states_sum = sum(fn(s[:, :-1], t[:, :-1], rows) for s, t in zip(s_states, t_states)) / len(s_states)
        if s_qkv:
            relations_sum = self._relations(s_qkv, t_qkv, rows, batch.get("attention_mask"))
        self.sums += torch.stack([states_sum.detach(), relations_sum.detach()]).double().cpu()
        return self.settings.weight * states_sum + self.settings.attention_relations.weight * relations_sum

    def _relations(self, s_qkv: tuple, t_qkv: tuple, rows: Tensor, attention_mask: Tensor | None) -> Tensor:
        heads = self.settings.attention_relations.heads
        keys = None if attention_mask is None else attention_mask[:, None, :-1].bool()  # (B, 1, T-1)
        total = torch.zeros((), device=rows.device)
        for s, t in zip(s_qkv, t_qkv):
            total = total + losses.relation(_split_heads(s, heads), _split_heads(t, heads), rows[:, None, :],
                                            key_mask=keys, causal=True)
        return total / (heads * len(s_qkv))

    def step_metrics(self, all_reduce, count: int) -> dict[str, float]:
        """This step's unweighted token means (summed over ranks by ``all_reduce``); resets the sums."""
        means = (all_reduce(self.sums) / max(count, 1)).tolist()
        self.sums = torch.zeros_like(self.sums)
        active = (bool(self.layer_map), self.student_site is not None)
        return {name: value for name, value, on in zip(METRIC_NAMES, means, active) if on}



def _split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, W) → (B, heads, T-1, W/heads): relation heads over the positions the loss counts."""
    B, T, W = x.shape
    return x[:, :-1].reshape(B, T - 1, heads, W // heads).transpose(1, 2)


def build(cfg, teacher: nn.Module | None, student: nn.Module) -> HiddenKD | None:
    """The run's hidden-state KD, checked against the loaded models (one line per problem), or None when off."""
    if not enabled(cfg):
        return None
    h = cfg.hidden
    layer_map, projections = [], None
    if h.weight > 0:
        layer_map = resolve_layer_map(h.layers, h.pairs, block_count(student), block_count(teacher))
        param = next(student.parameters())
        projections = Projections(h.projection, len(layer_map), width(student), width(teacher), h.seed).to(
            param.device, param.dtype)
    sites = (None, None)
    r = h.attention_relations
    if r.weight > 0:
        s_block, t_block = default_relation_blocks(student, teacher, r.layers)
        sites = (attention_site(student, s_block, r.relations, "student"),
                 attention_site(teacher, t_block, r.relations, "teacher"))
        check_relation_heads(r.heads, *sites, r.relations)
    return HiddenKD(h, layer_map, projections, *sites)


def add_terms(hidden: HiddenKD | None, out, student_extra: tuple, target, batch: dict):
    """``out`` (a ``LossOutput``) with the hidden-state terms added to its total; unchanged when hidden KD is off."""
    if hidden is None:
        return out
    if not getattr(target, "extra", ()):  # e.g. a privileged-context view: not the teacher seam's forward
        raise RuntimeError("hidden-state KD needs the live teacher's states from its seam (hidden.seam), but this "
                           f"batch's teacher signal is a {type(target).__name__} without them")
    return dataclasses.replace(out, total=out.total + hidden.loss_sum(tuple(student_extra), target.extra, batch))


# The loop's hooks: each takes the run's HiddenKD or None (hidden KD off).

def state_dict(hidden: HiddenKD | None) -> dict:
    """Checkpoint state: the projections' parameters as trained (an orthogonal one's unconstrained original)."""
    return {} if hidden is None or hidden.projections is None else {"projections": hidden.projections.state_dict()}


def load_state_dict(hidden: HiddenKD | None, state: dict | None) -> None:
    if hidden is None or hidden.projections is None:
        return
    if not state or "projections" not in state:
        raise ValueError("--resume: the checkpoint holds no hidden-state projections (written by a run without "
                         "hidden.weight?)")
    hidden.projections.load_state_dict(state["projections"])


def final_files(hidden: HiddenKD | None) -> dict[str, bytes]:
    """Files for final/potstill/: the trained projections beside (not inside) the exported student."""
    if hidden is None or hidden.projections is None:
        return {}
    return {FILE_NAME: hidden.projections.to_bytes(hidden.layer_map)}
