"""Loading teachers and students, and reaching the two pieces the fused loss needs: the last hidden states
and the output head. Everything model-specific the rest of potstill touches is here."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from potstill.encoders.seam import encoder_seam
from potstill.lora import effective_head

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How far the model's own logits may differ from s·(h·Wᵀ + b), relative to the largest logit: fp32 reassociation
# is ~1e-6; half precision rounds each logit to ~4e-3 relative. Post-processing (soft-capping at 30 when the
# largest logit is PROBE_LOGIT, a 1/16 logit scale) differs by tens of percent.
_HEAD_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
_HEAD_TOLERANCE_HALF = 5e-2
PROBE_LOGIT = 64.0


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def resolve_model_path(path: str) -> str:
    if path == "builtin":
        from potstill.builtin.teacher import builtin_teacher_dir

        return str(builtin_teacher_dir())
    if path == "builtin:bpe":  # tokenizer files only: the built-in byte-level BPE tokenizer (builtin/bpe.py)
        from potstill.builtin.bpe import bpe_tokenizer_dir

        return str(bpe_tokenizer_dir())
    return path


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files, or files transformers cannot read
        raise ValueError(f"{path}: no usable tokenizer ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    if tok.pad_token_id is None:  # batching needs a pad id; padded positions never get a label
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32", key: str = "model") -> PreTrainedModel:
    """A local HF model directory or a hub id. Local paths that do not exist fail here, with the path; a hub id
    that cannot be fetched fails with one line naming the config ``key`` (transformers reports missing repos,
    invalid ids and no network all as OSError)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").exists():
        raise FileNotFoundError(f"{key} {name_or_path!r}: model directory has no config.json (is the path right?)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(Path(name_or_path).expanduser()) if looks_local else name_or_path,
                                                     dtype=torch_dtype(dtype))
    except OSError as exc:
        if looks_local:
            raise
        raise FileNotFoundError(f"{key} {name_or_path!r}: not a local directory and not found on the Hugging Face "
                                "hub (offline?)") from exc
    check_plain_head(model)
    return model


def config_from(config: dict | str, defaults: dict | None = None):
    """student.config as a transformers config: a config.json path, or a dict with ``model_type`` whose missing keys
    come from ``defaults`` (what the tokenizer or the teacher already determines)."""
    if isinstance(config, str):
        return AutoConfig.from_pretrained(config)
    cfg = dict(config)
    if "model_type" not in cfg:
        raise ValueError("student.config needs a 'model_type' (e.g. llama, qwen2, gpt2, bert)")
    return AutoConfig.for_model(cfg.pop("model_type"), **{**(defaults or {}), **cfg})


def model_from_config(config: dict | str, dtype: str = "float32") -> PreTrainedModel:
    """A freshly initialised student from a config dict (with ``model_type``) or a config.json path."""
    model = AutoModelForCausalLM.from_config(config_from(config), dtype=torch_dtype(dtype))
    check_plain_head(model)
    return model


@torch.no_grad()
def check_plain_head(model: PreTrainedModel) -> None:
    """Refuse a model whose logits are not its output head applied to its decoder body's last hidden states.

    The fused loss computes ``h·Wᵀ + b`` itself, so anything the model does between the body and its logits —
    soft-capping (Gemma 2), a logit scale (Cohere, Granite), scaling hidden states before the head (MiniCPM) —
    would silently train other logits. Checked by behaviour, not by config names: one no-grad forward on a few
    token ids, with the head's output multiplied by a power of two (exact) so the largest logit is about
    PROBE_LOGIT (random tiny models have logits ≈ 0.1, where a soft-cap is invisible)."""
    head = model.get_output_embeddings()
    probe = _probe_forward(model, head)
    weight, bias = output_head(model)  # what the fused loss projects with (a LoRA head's effective weight)
    tolerance = _HEAD_TOLERANCE.get(weight.dtype, _HEAD_TOLERANCE_HALF)
    body_gap = _relative_gap(probe["body"], probe["head_input"])
    if body_gap > tolerance:
        raise NotImplementedError(
            f"{type(model).__name__} transforms its last hidden states before the output head (relative difference "
            f"{body_gap:.2g}); the fused loss path would train on different logits. This architecture is not supported yet")
    expected = probe["scale"] * F.linear(probe["head_input"], weight, bias).float()
    logit_gap = _relative_gap(probe["logits"], expected)
    if logit_gap > tolerance:
        raise NotImplementedError(
            f"{type(model).__name__} post-processes its logits (soft-capping or scaling: its logits differ from the "
            f"output head's by {logit_gap:.2g} relative); the fused loss path projects hidden states with the plain "
            "head and would train on different logits. This architecture is not supported yet")


def _relative_gap(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@torch.no_grad()
def _probe_forward(model: PreTrainedModel, head: nn.Module) -> dict:
    """Logits of a short probe sequence with the head's output scaled, the head's input, and the body's output."""
    vocab = head.weight.shape[0]
    ids = (torch.arange(8, device=head.weight.device) * 7919 % vocab)[None]  # a few distinct ids, any vocabulary
    seen: dict = {}

    def scale_output(module, args, output):
        seen["head_input"] = args[0].reshape(-1, args[0].shape[-1])
        seen["scale"] = 2.0 ** round(math.log2(PROBE_LOGIT / max(float(output.abs().max()), 1e-30)))
        return output * seen["scale"]

    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    handle = head.register_forward_hook(scale_output)
    try:
        logits = model(input_ids=ids, use_cache=False).logits
        body = hidden_states(model, ids)
    finally:
        handle.remove()
        model.train(was_training)
    if "head_input" not in seen:
        raise NotImplementedError(f"{type(model).__name__} computes its logits without calling its output head module; "
                                  "the fused loss path cannot reproduce them. This architecture is not supported yet")
    return {**seen, "logits": logits.reshape(-1, vocab), "body": body.reshape(-1, body.shape[-1])}


def decoder_outputs(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                    position_ids: Tensor | None = None, **options):
    """The decoder body's outputs (no (B, T, V) logits); ``options`` such as ``output_hidden_states=True``. Packed
    rows (data/packing.py) pass ``position_ids`` and no ``attention_mask``."""
    packed = {} if position_ids is None else {"position_ids": position_ids}  # not every decoder takes the argument
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **packed, **options)


def hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None = None,
                  position_ids: Tensor | None = None) -> Tensor:
    """Last hidden states (B, T, H) from the decoder body."""
    return decoder_outputs(model, input_ids, attention_mask, position_ids).last_hidden_state


def output_head(model: PreTrainedModel, vocab: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The output projection's weight (V, H) and bias, trimmed to the first ``vocab`` rows (padded vocabularies);
    for a LoRA-adapted head the effective weight, base + scaling·B·A (``lora.effective_head``)."""
    weight, bias = effective_head(model.get_output_embeddings())
    if vocab is not None:
        weight = weight[:vocab]
        bias = None if bias is None else bias[:vocab]
    return weight, bias


def output_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def truncated_copy(teacher: PreTrainedModel, n_layers: int, same_class: bool = False) -> PreTrainedModel:
    """A student initialised from the teacher's embeddings, first ``n_layers`` blocks, final norm and head (and any
    other weight: a pooler, a classification head). ``same_class``: the teacher's own class (classifiers, encoders)
    instead of the causal-LM auto class."""
    total = teacher.config.num_hidden_layers
    if not 0 < n_layers < total:
        raise ValueError(f"student.init_from_teacher_layers={n_layers} must be between 1 and {total - 1} (teacher has {total})")
    cfg = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": n_layers})
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    student = type(teacher)(cfg).to(teacher.dtype) if same_class else AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"teacher-truncation init could not fill {missing[:5]}")
    return student


class HiddenAndHead(nn.Module):
    """The forward the fused loss needs: last hidden states (B, T, H) and the output head (V, H) + bias, trimmed to
    ``vocab`` rows. Returned from ``forward`` so that a DDP or FSDP2 wrapper around this module sees the whole
    student step as one forward: DDP prepares its gradient reducer, FSDP2 keeps the root parameters (embeddings,
    final norm, a tied or untied head) unsharded while the loss uses the head. The head is always returned as a
    view (``[:vocab]``), never as the parameter itself, so hooks a wrapper puts on outputs do not pile up on it."""

    def __init__(self, model: PreTrainedModel, vocab: int):
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        encoded = encoder_seam(self.model, input_ids, attention_mask, self.vocab)  # classifiers, sentence encoders
        if encoded is not None:
            return encoded
        weight, bias = output_head(self.model, self.vocab)
        return hidden_states(self.model, input_ids, attention_mask, position_ids), weight, bias
