"""The built-in word-level tokenizer: one token per grammar word / arithmetic symbol, so word-level truth is
token-level truth; plus the exact next-token log-probs of a grammar text in this tokenizer's id space."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from potstill.builtin.arithmetic import ARITHMETIC_TOKENS
from potstill.builtin.grammar import HiddenMarkovSource
from potstill.builtin.lexicon import grammar_vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, in this order
CHAT_TOKENS = ["system", "user", "assistant", ":"]
# Turns render as "user : <content> assistant : <content> </s> ..." (BOS comes from the post-processor).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} "
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
MODEL_MAX_LENGTH = 4096


def builtin_vocabulary() -> list[str]:
    """Tokens in id order: specials, grammar words, then arithmetic and chat tokens not already present."""
    vocab = dict.fromkeys(SPECIAL_TOKENS)
    for token in [*grammar_vocabulary(), *ARITHMETIC_TOKENS, *CHAT_TOKENS]:
        vocab.setdefault(token)
    return list(vocab)


def _fast_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(builtin_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # split on whitespace only: "," stays one token
    core.post_processor = processors.TemplateProcessing(  # BOS only; EOS is the data pipeline's decision
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing any existing `target` (renames only, so readers never see a half-write)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the previous tokenizer back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def save_tokenizer_atomically(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Write ``tokenizer`` to `out_dir` atomically and return it as loaded from there (the real load path)."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left behind if something failed
    return AutoTokenizer.from_pretrained(out_dir)


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Write the built-in tokenizer to `out_dir` atomically and return it as loaded from there (offline)."""
    return save_tokenizer_atomically(_fast_tokenizer(), out_dir)


def _word_token_ids(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> np.ndarray:
    ids = tokenizer.convert_tokens_to_ids(words)
    missing = [w for w, i in zip(words, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer has no single token for {missing[:10]}; build it with build_tokenizer")
    return np.asarray(ids, dtype=np.int64)


def true_token_logprobs(
    tokenizer: PreTrainedTokenizerFast, source: HiddenMarkovSource, text: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Exact next-token log-probs (n_tokens, len(tokenizer)) for `text` from `source`.

    With ids = tokenizer(text)["input_ids"] + [eos] (BOS first), row i is the true distribution of ids[i+1]
    given ids[:i+1]: row 0 = the first word after BOS, the last row = EOS. Tokens the source never emits: -inf.
    """
    input_ids = tokenizer(text)["input_ids"]
    words = text.split()
    if input_ids[:1] != [tokenizer.bos_token_id] or len(input_ids) != len(words) + 1:
        raise ValueError("the tokenizer must add BOS and map each whitespace-separated word to one token")
    word_logprobs = source.next_word_logprobs(words)  # (len(words)+1, V+1) over [*source.words, EOS]
    columns = np.append(_word_token_ids(tokenizer, source.words), tokenizer.eos_token_id)  # (V+1,) source -> token
    if not np.array_equal(np.asarray(input_ids[1:]), columns[[source.word_index[w] for w in words]]):
        raise ValueError("the tokenizer's ids disagree with the source's words")
    out = np.full((len(words) + 1, len(tokenizer)), -np.inf)
    out[:, columns] = word_logprobs
    return torch.from_numpy(out).to(dtype)
