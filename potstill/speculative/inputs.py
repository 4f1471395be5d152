"""What `potstill speculate` measures on, loaded and checked before anything is timed or written: the settings,
the two models (eval mode, one device), the pair check, the prompts as token ids, and the held-out batches the
predicted α is computed on. Every problem is one ``ValueError`` / ``OSError`` line naming the option, file or
record, raised before the output directory exists.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from potstill import models, runtime
from potstill.data.batches import eval_batches
from potstill.data.encode import encode_all
from potstill.data.loading import is_builtin_spec, load_records, record_kind, record_location
from potstill.generation.prompts import Prompt, prompt_of
from potstill.generation.text import eos_ids
from potstill.precision import resolve_model_dtype

GAMMA_MAX = 8  # the largest γ a fixed-γ row may ask for (the sweep is 1..8)
TEXT_PROMPT_WORDS = 8  # a text record (e.g. --prompts builtin) is continued from its first this many words
EVAL_EXAMPLES = 64  # held-out records the predicted α is computed on
EVAL_MAX_LENGTH = 256
EVAL_BATCH_SIZE = 8


@dataclass(frozen=True)
class MeasureSettings:
    """The options of `potstill speculate` (see ``docs/speculative.md``)."""

    target: str
    draft: str
    prompts: str
    out: str = "runs/speculate"
    gammas: tuple[int, ...] = tuple(range(1, GAMMA_MAX + 1))
    adaptive: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_prompts: int = 32
    hf_assisted: bool = True
    eval_data: str | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    warmup: int = 2

    def check(self) -> None:
        if not self.gammas:
            raise ValueError("--gamma names no γ")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.max_prompts < 1:
            raise ValueError(f"--max-prompts must be ≥ 1, got {self.max_prompts}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be ≥ 0, got {self.warmup}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is a file, not a directory")

    def as_dict(self) -> dict:
        return {**asdict(self), "gammas": list(self.gammas)}


def parse_gammas(spec: str) -> tuple[int, ...]:
    """``4`` → (4,); ``1-8`` → (1, ..., 8); ``1,2,4`` → (1, 2, 4) (sorted, duplicates dropped); each γ in [1, 8]."""
    text = spec.replace(" ", "")
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
        raise ValueError(f"--gamma {spec!r}: write one γ (4), a range (1-8) or a list (1,2,4)")
    gammas: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first > last:
            raise ValueError(f"--gamma {spec!r}: the range {part} is empty (write low-high)")
        gammas.update(range(first, last + 1))
    if min(gammas) < 1 or max(gammas) > GAMMA_MAX:
        raise ValueError(f"--gamma {spec!r}: each γ must be between 1 and {GAMMA_MAX}")
    return tuple(sorted(gammas))


@dataclass
class Inputs:
    """Everything the measurement reads; ``prompt_ids[i]`` continues prompt ``prompt_numbers[i]``."""

    target: nn.Module
    draft: nn.Module
    tokenizer: object
    vocab: int  # the shared vocabulary size (padded head rows trimmed)
    eos: list[int]
    pad: int
    device: torch.device
    prompt_numbers: list[int]
    prompt_ids: list[list[int]]
    eval_batches: list[dict] = field(default_factory=list)  # empty without --eval-data
    target_path: str = ""
    draft_path: str = ""


def load_inputs(settings: MeasureSettings) -> Inputs:
    """Check the settings, read the prompt records, load and check both models, tokenize the prompts and the
    held-out data: cheapest checks first, so a typo fails before any model is loaded."""
    settings.check()
    prompts = read_prompts(settings.prompts, settings.max_prompts)
    device = runtime.resolve_device(settings.device)
    dtype = resolve_model_dtype(settings.dtype, device)
    target_path, draft_path = models.resolve_model_path(settings.target), models.resolve_model_path(settings.draft)
    target = models.load_causal_lm(target_path, dtype, key="--target").to(device).eval()
    draft = models.load_causal_lm(draft_path, dtype, key="--draft").to(device).eval()
    tokenizer = models.load_tokenizer(target_path)
    vocab = check_pair(tokenizer, draft_path, target, draft)
    eos = eos_ids(target, tokenizer)
    ids = [prompt_token_ids(p, tokenizer, settings) for p in prompts]
    context = min(_context(target), _context(draft))
    for prompt, prompt_ids in zip(prompts, ids):
        _check_fits(prompt, prompt_ids, settings, context)
    batches = held_out_batches(settings.eval_data, tokenizer) if settings.eval_data else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return Inputs(target, draft, tokenizer, vocab, eos, pad, device, [p.prompt_id for p in prompts], ids, batches,
                  target_path, draft_path)


def check_pair(tokenizer, draft_path: str, target: nn.Module, draft: nn.Module) -> int:
    """The shared vocabulary size of a usable (target, draft) pair, else one line saying what differs.

    Seam: ``potstill.speculative.compat.check_draft`` (vocabulary size, tokenizer, special tokens, as HF
    assisted generation and vLLM need them) when that module is present; until then equal output sizes (a draft
    with more rows could propose an id the target cannot embed) and the KD pair check (``guardrails.check_pair``:
    tokenizers by behaviour, special tokens, heads covering the tokenizer)."""
    from potstill.assemble import _student_tokenizer
    from potstill.guardrails import check_pair as kd_check_pair

    draft_tokenizer = _student_tokenizer(draft_path, tokenizer)  # a draft dir without tokenizer files borrows the target's
    try:
        from potstill.speculative.compat import check_draft
    except ImportError:
        target_rows, draft_rows = models.output_size(target), models.output_size(draft)
        if target_rows != draft_rows:
            raise ValueError(f"--draft {draft_path}: its output layer has {draft_rows} rows (vocab_size) but the "
                             f"target's has {target_rows}; speculative decoding needs the target's vocabulary size") from None
        return kd_check_pair(tokenizer, draft_tokenizer, target, draft)
    return check_draft(tokenizer, draft_tokenizer, target, draft)


def read_prompts(spec: str, limit: int) -> list[Prompt]:
    """The prompts of --prompts, at most ``limit``: prompt/completion and chat records as `potstill generate`
    reads them (``generation.prompts.prompt_of``); a text record (``builtin`` is the built-in language's texts)
    becomes its first TEXT_PROMPT_WORDS words. Built-in sources give their validation split (held-out prompts)."""
    split = "validation" if is_builtin_spec(spec) else "train"
    records = load_records(spec, split, limit)
    if not records:
        raise ValueError(f"--prompts {spec}: no prompts")
    prompts = []
    for number, record in records:
        where = record_location(spec, number)
        if record_kind(record, where) == "text":
            words = record["text"].split()
            if not words:
                raise ValueError(f"{where}: the text is empty, so there is no prompt to continue")
            prompts.append(Prompt(number, prompt=" ".join(words[:TEXT_PROMPT_WORDS])))
        else:
            prompts.append(prompt_of(record, number, where))
    return prompts


def prompt_token_ids(prompt: Prompt, tokenizer, settings: MeasureSettings) -> list[int]:
    where = record_location(settings.prompts, prompt.prompt_id)
    if prompt.messages is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: a chat record, but the target's tokenizer has no chat template to render it")
    ids = prompt.token_ids(tokenizer)
    if not ids:
        raise ValueError(f"{where}: the prompt encodes to no tokens")
    return ids


def _context(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _check_fits(prompt: Prompt, ids: list[int], settings: MeasureSettings, context: int | None) -> None:
    # the verification pass reads up to γ tokens past the last committed one
    largest = GAMMA_MAX if settings.adaptive else max(settings.gammas)
    needed = len(ids) + settings.max_new_tokens + largest
    if context is not None and needed > context:
        raise ValueError(f"{record_location(settings.prompts, prompt.prompt_id)}: {len(ids)} prompt tokens + "
                         f"--max-new-tokens {settings.max_new_tokens} + γ {largest} exceed the models' "
                         f"context of {context} positions; lower --max-new-tokens or shorten the prompt")


def held_out_batches(spec: str, tokenizer) -> list[dict]:
    """Teacher-forced batches of the first EVAL_EXAMPLES records of --eval-data (a built-in source's validation
    split), encoded with the target's tokenizer as training encodes them (labels on completions / assistant turns)."""
    split = "validation" if is_builtin_spec(spec) else "train"
    examples, _ = encode_all(tokenizer, load_records(spec, split, EVAL_EXAMPLES), EVAL_MAX_LENGTH, spec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return eval_batches(examples, EVAL_BATCH_SIZE, pad)
