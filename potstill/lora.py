"""LoRA students through peft: wrapping the built student, the head the fused loss must use, checkpoints
holding only the adapters, and the merged final student.

The fused loss never calls the student's forward: it runs the decoder body (``get_decoder()``, whose layers
peft has replaced in place, so the adapters run) and projects with the head's weight itself. A LoRA-adapted head
therefore has to hand out its *effective* weight, W + scaling·B·A (``effective_head``); a ``modules_to_save``
head hands out its trained copy. peft is imported only when a run asks for LoRA (it takes seconds to import).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from potstill.registry import did_you_mean

log = logging.getLogger("potstill")

ALL_LINEAR = "all-linear"
ADAPTER_DIR = "adapter"  # final/adapter/ with student.lora.save_adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_settings(s) -> None:
    """Value checks of ``student.lora`` at config load (module names are checked against the model later)."""
    if s.r < 0:
        raise ValueError(f"student.lora.r must be ≥ 0 (0 = no LoRA, train every weight), got {s.r}")
    if s.r == 0:
        return
    if s.alpha is not None and s.alpha <= 0:
        raise ValueError(f"student.lora.alpha must be > 0 (or null = r), got {s.alpha}")
    if not 0 <= s.dropout < 1:
        raise ValueError(f"student.lora.dropout must be in [0, 1), got {s.dropout}")
    if not target_names(s.target_modules):
        raise ValueError("student.lora.target_modules is empty: use all-linear or a list of module names, e.g. [q_proj, v_proj]")


def target_names(target_modules: str | list | None) -> str | list[str]:
    """``all-linear`` as peft spells it, else a list of module names (a string is read as comma-separated names:
    peft would treat a plain string as a regular expression over full module paths)."""
    if target_modules is None:
        return ALL_LINEAR
    if isinstance(target_modules, str):
        if target_modules.strip() == ALL_LINEAR:
            return ALL_LINEAR
        return [n.strip() for n in target_modules.split(",") if n.strip()]
    return [str(n) for n in target_modules]


def is_adapted(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no peft model can exist before peft is imported
        return False
    from peft import PeftModel
    return isinstance(model, PeftModel)


def adapt(model: nn.Module, s) -> nn.Module:
    """The student with LoRA adapters (base weights frozen), or the model itself when ``student.lora.r`` is 0."""
    if s.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = target_names(s.target_modules)
    _check_modules(model, targets, s.modules_to_save or [])
    config = LoraConfig(r=s.r, lora_alpha=s.alpha if s.alpha is not None else s.r, lora_dropout=s.dropout,
                        target_modules=targets, modules_to_save=s.modules_to_save, use_rslora=s.rslora,
                        task_type="CAUSAL_LM")
    adapted = get_peft_model(model, config)
    head = adapted.get_output_embeddings()
    if s.dropout > 0 and _is_lora_layer(head):
        raise ValueError("student.lora.dropout > 0 with lm_head in student.lora.target_modules: the fused loss folds "
                         "the head's adapter into its weight, where input dropout cannot apply; set dropout to 0 or "
                         "leave lm_head out")
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    total = sum(p.numel() for p in adapted.parameters())
    log.info(f"LoRA r={s.r}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return adapted


def _check_modules(model: nn.Module, targets: str | list[str], to_save: list[str]) -> None:
    """Every named module exists (by its last name component, as peft matches them) and none touches a weight
    tied to the embeddings (merging would change both, so the merged model would differ from the trained one)."""
    leaves = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules() if name}
    linear = sorted({n for n, m in leaves.items() if isinstance(m, (nn.Linear, nn.Embedding)) or type(m).__name__ == "Conv1D"})
    named = ([] if targets == ALL_LINEAR else [("target_modules", n) for n in targets]) + [("modules_to_save", n) for n in to_save]
    for key, name in named:
        if name not in leaves:
            raise ValueError(f"student.lora.{key}: the student has no module {name!r}.{did_you_mean(name, linear)} "
                             f"Its linear and embedding modules: {', '.join(linear)}")
    tied = _tied_names(model, leaves)
    for key, name in named:
        if name in tied:
            raise ValueError(f"student.lora.{key}: {name!r} shares its weight with {' and '.join(sorted(tied - {name}))} "
                             "(tie_word_embeddings); adapting it would change both. Leave it out, or use an untied student")


def _tied_names(model: nn.Module, leaves: dict[str, nn.Module]) -> set[str]:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return set()
    return {n for n, m in leaves.items() if m is head or m is embed}


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer
    return isinstance(module, LoraLayer)


def effective_head(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (V, H) weight and bias the head applies. For a LoRA-adapted head (unmerged): base weight + Σ over active
    adapters of scaling·B·A (peft's ``get_delta_weight``, differentiable in A and B). A ``modules_to_save`` wrapper
    exposes its trained copy's weight already."""
    if not ("peft" in sys.modules and _is_lora_layer(head)) or head.merged or head.disable_adapters:
        return head.weight, head.bias
    base = head.get_base_layer()
    weight = base.weight
    for name in head.active_adapters:
        if name in head.lora_A:
            weight = weight + head.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias


def load_adapters(path: Path, model: nn.Module) -> None:
    """Restore the adapter (and modules_to_save) weights of a checkpoint written by ``PeftModel.save_pretrained``."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_WEIGHTS
    if not file.exists():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}; this checkpoint was not written by a LoRA run "
                                "(student.lora.r must match the run's)")
    result = set_peft_model_state_dict(model, load_file(file, device=str(next(model.parameters()).device)))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{file}: adapter weights do not fit the student (missing {missing[:3]}, "
                           f"unexpected {list(result.unexpected_keys)[:3]})")


class MergedStudent:
    """What ``checkpoint.save_model_dir`` writes as final/ for a LoRA run: the adapters (final/adapter/, on request)
    and then the student with the adapters merged into its weights, a plain HF model. Merging happens in place at
    save time, so the run's PeftModel keeps computing the same function afterwards (now from merged weights)."""

    def __init__(self, model: nn.Module, save_adapter: bool):
        self.model, self.save_adapter = model, save_adapter

    def save_pretrained(self, path: Path, **kwargs) -> None:
        if self.save_adapter:
            self.model.save_pretrained(Path(path) / ADAPTER_DIR, **kwargs)
        merged = self.model.merge_and_unload()
        merged.save_pretrained(path, **kwargs)


def final_form(model: nn.Module, s) -> nn.Module | MergedStudent:
    """The object final/ is saved from: the student itself, or for a LoRA student its merged form."""
    return MergedStudent(model, s.save_adapter) if is_adapted(model) else model

