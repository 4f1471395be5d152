"""A byte-level BPE tokenizer for the built-in language: a genuinely different tokenisation of the same text than
the word-level built-in tokenizer (``tokenizer.py``), for cross-tokenizer distillation (docs/cross-tokenizer.md).

Trained with the `tokenizers` library on the first ``TRAINING_DOCUMENTS`` built-in training documents, vocabulary
``VOCAB_SIZE`` (the 256 byte symbols, the specials and ~250 merges): common words are one token ("Ġthe"), rarer
ones split ("Ġla" "z" "y"), about 1.5 tokens per word. Training is deterministic (two builds give the same
vocabulary and merges), and the shipped copy (``assets/bpe``) is what a fresh build gives (both tested). The conventions
are the word-level tokenizer's: ``<pad> <s> </s> <unk>`` are ids 0..3, BOS is added by the post-processor, EOS
is the data pipeline's decision, and the same chat turns (spaces placed for a BPE: ``CHAT_TEMPLATE``). Spaces are part of the next token ("Ġcat"), so a
token's character offsets cover its leading space; decoding gives the text back byte for byte.

Refer to it as ``builtin:bpe`` wherever a tokenizer path is read (``models.resolve_model_path``).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from potstill.builtin.grammar import builtin_texts
from potstill.builtin.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, PAD, SPECIAL_TOKENS, UNK, save_tokenizer_atomically

NAME = "builtin:bpe"
SHIPPED = Path(__file__).parent / "assets" / "bpe"
VOCAB_SIZE = 512
TRAINING_DOCUMENTS = 2000
# The word-level template's turns ("user : <content> assistant : ..."), with each separating space at the START of
# the next piece instead of the end of the previous one: a BPE attaches a space to the following word ("Ġa"), so a
# rendering that ends in a space would not tokenise as a prefix of the longer conversation (data/encode.py needs
# that to find the assistant tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %} {% endif %}"
    "{{ message['role'] }} : {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %} {% endif %}assistant :{% endif %}"
)


def _trained_core() -> Tokenizer:
    core = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte has a symbol, nothing is unknown
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(builtin_texts("train", TRAINING_DOCUMENTS), trainer)
    bos = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(  # BOS only, as the word-level tokenizer
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)])
    return core


def fast_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A freshly trained copy (in memory)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained_core(), bos_token=BOS, eos_token=EOS,
                                        pad_token=PAD, unk_token=UNK, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_bpe_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train it and write it to ``out_dir`` atomically; returns it as loaded from there (the real load path)."""
    return save_tokenizer_atomically(fast_bpe_tokenizer(), out_dir)


def bpe_tokenizer_dir() -> Path:
    """The shipped copy; rebuild it with ``python -m potstill.builtin.bpe``."""
    if not (SHIPPED / "tokenizer.json").exists():
        raise FileNotFoundError(f"the built-in BPE tokenizer is missing from this install ({SHIPPED}); "
                                "rebuild it with: python -m potstill.builtin.bpe")
    return SHIPPED


if __name__ == "__main__":
    print(build_bpe_tokenizer(SHIPPED).name_or_path)
