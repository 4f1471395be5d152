"""Can a serving engine run this draft beside this target? The checks draft-model speculative decoding needs.

A potstill draft is a plain HF directory (``final/``). Engines verify a draft's tokens by id, so the two models must
mean the same thing by every id the draft can emit:
- vLLM (``speculative_config={"method": "draft_model", ...}``) refuses a draft whose vocab_size differs from the
  target's;
- HF ``generate(assistant_model=...)`` treats different vocab_size values as different tokenizers and then needs
  ``tokenizer`` + ``assistant_tokenizer`` (universal assisted decoding: re-tokenised text, not potstill's case);
- both stop on the target's EOS ids and feed the draft the target's token ids, so BOS/EOS/PAD must agree.
Training trims padded output rows (``guardrails.shared_vocab``); serving engines do not, so equal config
vocab_size is checked here, not only the tokenizer's length. ``check_draft`` refuses with one line per problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from potstill.guardrails import compare_tokenizers
from potstill.models import load_tokenizer, resolve_model_path

SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class DraftMismatch(ValueError):
    """The draft cannot serve this target in draft-model speculative decoding."""


@dataclass(frozen=True)
class DraftInfo:
    """What target and draft share (the checks passed)."""

    vocab_size: int  # config vocab_size = embedding and output rows of both models
    tokens: int  # len(tokenizer) ≤ vocab_size (rows past it are padding)
    bos_token_id: int | None
    eos_token_ids: list[int]  # what ends a generation: the target's generation_config EOS ids (else its config's)
    pad_token_id: int | None


@dataclass
class _Side:
    """One model as the checks see it; ``rows`` holds (what, count) pairs that must equal config vocab_size."""

    name: str
    config: object
    generation: GenerationConfig
    tokenizer: object
    rows: list[tuple[str, int]]


def _ids(value) -> list[int] | None:
    """An id or list of ids as a sorted list (EOS may be either), None when unset."""
    if value is None:
        return None
    return sorted(value) if isinstance(value, (list, tuple)) else [int(value)]


def _side(name: str, model, tokenizer) -> _Side:
    """A path (HF dir, hub id, `builtin`) is read without its weights: a saved checkpoint's embedding has
    config.vocab_size rows (from_pretrained refuses anything else). A loaded model is read as it is."""
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise ValueError(f"check_draft: pass {name}_tokenizer with a loaded {name} model")
        rows = [("input embedding rows", model.get_input_embeddings().weight.shape[0]),
                ("output rows", model.get_output_embeddings().weight.shape[0])]
        return _Side(name, model.config.get_text_config(), model.generation_config, tokenizer, rows)
    path = resolve_model_path(str(model))
    if not (Path(path).expanduser() / "config.json").exists():
        raise FileNotFoundError(f"{name} {str(model)!r}: model directory has no config.json (is the path right?)")
    config = AutoConfig.from_pretrained(path)
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: transformers derives it from the model config
        generation = GenerationConfig.from_model_config(config)
    return _Side(name, config.get_text_config(), generation, tokenizer if tokenizer is not None else load_tokenizer(path), [])


def _vocab_problems(target: _Side, draft: _Side, equal_vocab_size: bool) -> list[str]:
    problems = []
    for side in (target, draft):
        for what, rows in side.rows:
            if rows != side.config.vocab_size:
                problems.append(f"the {side.name} has {rows} {what} but config vocab_size {side.config.vocab_size}")
        if len(side.tokenizer) > side.config.vocab_size:
            problems.append(f"the {side.name}'s tokenizer has {len(side.tokenizer)} tokens, more than its vocab_size "
                            f"{side.config.vocab_size}")
    if equal_vocab_size and target.config.vocab_size != draft.config.vocab_size:
        problems.append(f"vocab_size differs: target {target.config.vocab_size}, draft {draft.config.vocab_size} "
                        "(vLLM requires equal vocabulary sizes; HF assisted generation would treat them as different "
                        f"tokenizers): give the draft vocab_size {target.config.vocab_size}, e.g. "
                        "student.init_from_teacher_layers, or student.config without a vocab_size of its own")
    return problems


def _special_problems(target: _Side, draft: _Side) -> list[str]:
    """Model-level special ids (config and generation_config), beside the tokenizers' own (compare_tokenizers)."""
    problems = []
    for name in SPECIAL_IDS:
        t, d = _ids(getattr(target.config, name, None)), _ids(getattr(draft.config, name, None))
        if t != d:
            problems.append(f"config {name} differs: target {t}, draft {d}")
    t, d = _ids(target.generation.eos_token_id), _ids(draft.generation.eos_token_id)
    if t != d:
        problems.append(f"generation_config eos_token_id differs: target {t}, draft {d}")
    return problems


def check_draft(target: str | Path | PreTrainedModel, draft: str | Path | PreTrainedModel, *,
                target_tokenizer=None, draft_tokenizer=None, equal_vocab_size: bool = True) -> DraftInfo:
    """Refuse a draft that engines would reject or, worse, run wrongly: different vocab_size (config or embedding
    rows), different tokenizers (by vocabulary, special tokens and behaviour: ``guardrails.compare_tokenizers``),
    different BOS/EOS/PAD ids in the model configs. Paths are read without weights; loaded models need their
    tokenizers passed. ``equal_vocab_size=False`` accepts padded heads of different widths over one tokenizer
    (e.g. Qwen2.5 0.5B's 151,936 rows for 7B's 152,064), which potstill's own decoder handles but HF assisted
    generation and vLLM refuse. Returns what the two share."""
    t, d = _side("target", target, target_tokenizer), _side("draft", draft, draft_tokenizer)
    problems = _vocab_problems(t, d, equal_vocab_size)
    problems += [f"tokenizers differ: {p}" for p in compare_tokenizers(t.tokenizer, d.tokenizer, names=("target", "draft"))]
    problems += _special_problems(t, d)
    if problems:
        raise DraftMismatch(f"draft {draft!s:.80} cannot serve target {target!s:.80} in speculative decoding: " + "; ".join(problems))
    eos = _ids(t.generation.eos_token_id) or _ids(t.config.eos_token_id) or _ids(t.tokenizer.eos_token_id) or []
    return DraftInfo(t.config.vocab_size, len(t.tokenizer), t.config.bos_token_id, eos, t.config.pad_token_id)


def configure_hf_assistant(draft: PreTrainedModel, gamma: int) -> PreTrainedModel:
    """Make HF assisted generation draft exactly ``gamma`` tokens per round with ``draft`` as ``assistant_model``.

    transformers (5.x) reads these from the *assistant's* generation_config, not from ``generate(...)`` kwargs;
    its defaults (a confidence threshold of 0.4 that ends a round early, and a heuristic schedule when set) give a
    varying γ. Returns the model (its generation_config changed in place)."""
    if gamma < 1:
        raise ValueError(f"gamma must be ≥ 1, got {gamma}")
    config = draft.generation_config
    config.num_assistant_tokens = gamma
    config.num_assistant_tokens_schedule = "constant"
    config.assistant_confidence_threshold = 0.0  # 0 = no early stop inside a round
    return draft
