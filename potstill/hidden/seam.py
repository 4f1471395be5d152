"""The forward seam with hidden states: ``models.HiddenAndHead`` that also returns the mapped layers' states
(projected, for the student) and the q/k/v projection outputs of one block, captured with
``output_hidden_states=True`` and forward hooks held only for the duration of the call — no model code is edited,
and DDP/FSDP2 around the seam still see the student's step as one forward (the projections are its submodules)."""
from __future__ import annotations

from torch import Tensor, nn

from potstill.hidden.layers import AttentionSite
from potstill.hidden.projections import Projections
from potstill.models import HiddenAndHead, decoder_outputs, output_head


class HiddenKDSeam(HiddenAndHead):
    """``forward`` → (last hidden states (B, T, H), head weight, head bias, states, qkv): ``states`` the hidden
    states at ``layer_indices`` (hidden-state index: 0 = embeddings), each through its projection when
    ``projections`` is given; ``qkv`` the outputs (B, T, width) of ``site``'s modules, in its order (empty without
    a site)."""

    def __init__(self, model: nn.Module, vocab: int, layer_indices: list[int], projections: Projections | None = None,
                 site: AttentionSite | None = None):
        super().__init__(model, vocab)
        self.layer_indices = list(layer_indices)
        self.projections = projections
        self._site_modules = () if site is None else site.modules  # a tuple: not registered twice as submodules

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None):
        weight, bias = output_head(self.model, self.vocab)
        captured: dict[int, Tensor] = {}
        handles = [module.register_forward_hook(lambda _m, _a, out, i=i: captured.setdefault(i, out))
                   for i, module in enumerate(self._site_modules)]
        try:
            out = decoder_outputs(self.model, input_ids, attention_mask, position_ids,
                                  output_hidden_states=bool(self.layer_indices))
        finally:
            for handle in handles:
                handle.remove()
        states = tuple(out.hidden_states[i] for i in self.layer_indices) if self.layer_indices else ()
        if self.projections is not None:
            states = tuple(self.projections(k, h) for k, h in enumerate(states))
        qkv = tuple(captured[i] for i in range(len(self._site_modules)))
        return out.last_hidden_state, weight, bias, states, qkv
