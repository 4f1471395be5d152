"""Whether a model keeps packed documents apart (``data.packing``), checked by behaviour at load.

Packing relies on transformers building the attention mask from position ids when no attention mask is given
(``masking_utils.find_packed_sequence_indices``). Models that build their own mask or positions (OPT, Falcon,
Bloom's ALiBi in transformers 5.23) let a packed document attend to the one before it, which would train silently
wrong; such a model is refused before step 1, as ``models.check_plain_head`` refuses other unsupported heads.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from potstill.models import hidden_states

# Documents B after A and after A' (same length, other tokens): a model that masks across documents computes
# exactly the same states for B (masked scores contribute exact zeros), so any gap is leakage. B packed vs B alone
# runs other shapes and kernels: fp32 reassociation (~1e-7 here), half precision rounding.
_LEAK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_LEAK_TOLERANCE_HALF = 1e-3
_ALONE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_ALONE_TOLERANCE_HALF = 5e-2
_FIRST, _SECOND = 24, 6  # a long first document, so that attention leaking from it shows in the short second one


def _gap(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@torch.no_grad()
def packing_gaps(model: PreTrainedModel) -> tuple[float, float]:
    """(leak, alone): the second document's relative hidden-state gap between packing it after two different
    first documents, and between packed and run alone."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    ids = lambda n, step, offset: ((torch.arange(n, device=device) * step + offset) % vocab)[None]  # noqa: E731
    first, other_first, second = ids(_FIRST, 7919, 3), ids(_FIRST, 104729, 5), ids(_SECOND, 1031, 11)
    positions = torch.cat([torch.arange(_FIRST), torch.arange(_SECOND)]).to(device)[None]
    was_training = model.training
    model.eval()  # dropout would make the passes differ
    try:
        after = hidden_states(model, torch.cat([first, second], 1), position_ids=positions)[:, _FIRST:]
        after_other = hidden_states(model, torch.cat([other_first, second], 1), position_ids=positions)[:, _FIRST:]
        alone = hidden_states(model, second)
    finally:
        model.train(was_training)
    return _gap(after, after_other), _gap(after, alone)


def check_packing(model: PreTrainedModel, key: str) -> None:
    """Refuse ``data.packing`` for a model (config ``key``, e.g. 'student') that attends across packed documents or
    does not restart positions at each one."""
    dtype = model.get_input_embeddings().weight.dtype
    leak, alone = packing_gaps(model)
    name = f"{type(model).__name__} ({key}, attention {model.config._attn_implementation})"
    if leak > _LEAK_TOLERANCE.get(dtype, _LEAK_TOLERANCE_HALF):
        raise NotImplementedError(f"data.packing: {name} lets a packed document attend to the one before it (relative "
                                  f"difference {leak:.2g}); set data.packing=false for this model")
    if alone > _ALONE_TOLERANCE.get(dtype, _ALONE_TOLERANCE_HALF):
        raise NotImplementedError(f"data.packing: {name} computes a packed document differently from the same "
                                  f"document alone (relative difference {alone:.2g}: positions not restarted per "
                                  "document?); set data.packing=false for this model")


def check_parts_for_packing(parts) -> None:
    """``check_packing`` for every model a run with ``data.packing`` feeds packed rows (an ``assemble.Parts``)."""
    for key, model in (("student", parts.student), ("teacher", parts.teacher), ("loss.reference", parts.reference)):
        if model is not None:
            check_packing(model, key)
