"""Byte-level BPE tokenizers for the cross-tokenizer tests, saved to a directory and loaded back the real way
(AutoTokenizer.from_pretrained): one with explicit merges (hand-derivable token splits), one trained with
`tokenizers` on built-in text."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]


def _save(core: Tokenizer, out: Path, bos: bool):
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def explicit_bpe(out: Path, merges: list[tuple[str, str]], bos: bool = False):
    """Byte-level BPE over the 256 byte symbols plus exactly these merges (ids: specials, bytes, merges in order)."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    core = Tokenizer(models.BPE(vocab, merges))
    core.add_special_tokens(SPECIALS)
    return _save(core, out, bos)


def trained_bpe(out: Path, texts: list[str], vocab_size: int, bos: bool = False):
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    return _save(core, out, bos)
