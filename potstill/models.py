"""Loading teachers and students, and reaching the two pieces the fused loss needs: the last hidden states
and the output head. Everything model-specific the rest of potstill touches is here."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Heads that post-process logits (soft-capping, scaling) would make hidden @ Wᵀ differ from the model's logits.
_UNSUPPORTED_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


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


def model_from_config(config: dict | str, dtype: str = "float32") -> PreTrainedModel:
    """A freshly initialised student from a config dict (with ``model_type``) or a config.json path."""
    if isinstance(config, str):
        cfg = AutoConfig.from_pretrained(config)
    else:
        cfg = dict(config)
        if "model_type" not in cfg:
            raise ValueError("student.config needs a 'model_type' (e.g. llama, qwen2, gpt2)")
        cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(dtype))
    check_plain_head(model)
    return model


def check_plain_head(model: PreTrainedModel) -> None:
    for name in _UNSUPPORTED_HEAD_FIELDS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} post-processes its logits ({name}={value}); the fused loss path "
                "projects hidden states with the plain output head and would train on different logits"
            )


def hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Last hidden states (B, T, H) from the decoder body, without computing the (B, T, V) logits."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def output_head(model: PreTrainedModel, vocab: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The output projection's weight (V, H) and bias, trimmed to the first ``vocab`` rows (padded vocabularies)."""
    head: nn.Linear = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if vocab is not None:
        weight = weight[:vocab]
        bias = None if bias is None else bias[:vocab]
    return weight, bias


def output_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def truncated_copy(teacher: PreTrainedModel, n_layers: int) -> PreTrainedModel:
    """A student initialised from the teacher's embeddings, first ``n_layers`` blocks, final norm and head."""
    total = teacher.config.num_hidden_layers
    if not 0 < n_layers < total:
        raise ValueError(f"student.init_from_teacher_layers={n_layers} must be between 1 and {total - 1} (teacher has {total})")
    cfg = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": n_layers})
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"teacher-truncation init could not fill {missing[:5]}")
    return student
