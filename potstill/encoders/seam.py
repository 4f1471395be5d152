"""The encoder kinds' forward seam: what `models.HiddenAndHead` returns for a classifier or a sentence encoder.

- A sequence classifier (AutoModelForSequenceClassification): its logits are a final linear layer (the head) applied
  to one pooled vector per text — for BERT the pooler output after dropout, for decoder classifiers (Llama, Qwen2)
  the hidden state at the last non-pad position. The seam captures the head's input with a forward hook (no model
  code edited), pools it as transformers does, and returns it as hidden states (B, T, H) whose position 0 holds the
  pooled vector, with the head (num_labels, H) + bias: the fused loss then sees one "token" per text (the batch's
  label sits at position 1, so the loop's shift puts it at position 0; see encoders/data.py). `check_classifier`
  proves, at load, that head(pooled) reproduces the model's own logits.
- A sentence encoder (AutoModel, e.g. BertModel): mean pooling over non-pad tokens (or the first token), L2
  normalised when asked; returned as (embeddings (B, H), None, None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

_CHECK_TOLERANCE = 1e-4  # relative: fp32 reassociation between the model's head call and ours


def is_sequence_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def is_sentence_encoder(model: nn.Module) -> bool:
    """A bare encoder body (BertModel and the like): no head of its own; the seam pools it."""
    return isinstance(model, PreTrainedModel) and getattr(model, "potstill_pooling", None) is not None


def auto_class_of(model: nn.Module):
    """The Auto class that reloads ``model`` from a saved directory (checkpoints, resume)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if is_sequence_classifier(model):
        return AutoModelForSequenceClassification
    return AutoModel if is_sentence_encoder(model) else AutoModelForCausalLM


def classifier_head(model: nn.Module) -> nn.Linear:
    """The last nn.Linear producing num_labels outputs: BERT's `classifier`, Llama's `score`, RoBERTa's
    `classifier.out_proj`. Whether it really is the head is checked by behaviour (``check_classifier``)."""
    n = model.config.num_labels
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n]
    if not heads:
        raise NotImplementedError(f"{type(model).__name__} has no linear layer with num_labels={n} outputs; "
                                  "this classifier architecture is not supported")
    return heads[-1]


def _last_non_pad(model: nn.Module, input_ids: Tensor) -> Tensor:
    """transformers' rule for decoder classifiers: the rightmost token that is not config.pad_token_id."""
    pad = model.config.pad_token_id
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    if pad is None:
        return torch.full(input_ids.shape[:1], input_ids.shape[-1] - 1, device=input_ids.device)
    return (positions * (input_ids != pad)).argmax(-1)


def pooled_and_head(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                    rows: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(pooled (B, H), head weight (rows, H), bias (rows,)): the head's input captured in the model's own forward
    (dropout included in train mode), pooled at the position transformers pools decoder classifiers at."""
    head = classifier_head(model)
    seen: dict = {}
    handle = head.register_forward_hook(lambda module, args, output: seen.setdefault("x", args[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    x = seen["x"]
    if x.dim() == 3:  # a per-token head (decoder classifiers): transformers pools its logits after the head
        x = x[torch.arange(x.shape[0], device=x.device), _last_non_pad(model, input_ids)]
    weight, bias = head.weight, head.bias
    if rows is not None:  # a view, never the parameter itself (see models.HiddenAndHead)
        weight, bias = weight[:rows], None if bias is None else bias[:rows]
    return x, weight, bias


def classifier_seam(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                    rows: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The classifier in the layout of the loop: pooled vector at position 0 of (B, T, H) (an expand: no copy)."""
    pooled, weight, bias = pooled_and_head(model, input_ids, attention_mask, rows)
    return pooled[:, None, :].expand(-1, input_ids.shape[1], -1), weight, bias


def sentence_embeddings(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, H) pooled embeddings as sentence-transformers computes them: mean over attended tokens (or the first
    token), then L2-normalised when the model was set up with normalize."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    if model.potstill_pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1) if model.potstill_normalize else pooled


def mark_sentence_encoder(model: PreTrainedModel, pooling: str, normalize: bool) -> PreTrainedModel:
    """Tag a bare encoder with how the seam pools it (the tag travels with the module into DDP/FSDP wrappers)."""
    model.potstill_pooling, model.potstill_normalize = pooling, normalize
    return model


def encoder_seam(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, rows: int):
    """The seam for an encoder kind, or None for a causal LM (models.HiddenAndHead's hook)."""
    if is_sequence_classifier(model):
        return classifier_seam(model, input_ids, attention_mask, rows)
    if is_sentence_encoder(model):
        return sentence_embeddings(model, input_ids, attention_mask), None, None
    return None


@torch.no_grad()
def check_classifier(model: nn.Module, pad_id: int, what: str) -> None:
    """Refuse a classifier whose logits are not its head applied to the vector the seam pools: two probe texts of
    different lengths (right-padded), eval mode, head(pooled) vs the model's own logits."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(12, device=model.device) * 7919 % vocab).reshape(2, 6)
    ids = torch.where(ids == pad_id, (ids + 1) % vocab, ids)
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = pad_id, 0
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        pooled, weight, bias = pooled_and_head(model, ids, mask)
    finally:
        model.train(was_training)
    ours = F.linear(pooled, weight, bias).float()
    gap = float((logits - ours).abs().max() / logits.abs().max().clamp_min(1e-30))
    if logits.shape != ours.shape or gap > _CHECK_TOLERANCE:
        raise NotImplementedError(f"{what}: {type(model).__name__}'s logits are not its classification head applied to "
                                  f"one pooled vector per text (relative difference {gap:.2g}); not supported")
