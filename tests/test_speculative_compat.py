"""check_draft: a draft serving engines accept for a target, and one clear refusal for each way it can differ."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from potstill.speculative.compat import DraftMismatch, check_draft, configure_hf_assistant
from tests.conftest import save_tiny_model


@pytest.fixture(scope="module")
def target_dir(model_dirs):
    return model_dirs["llama_teacher"]


def test_a_draft_with_the_targets_tokenizer_passes(tmp_path, tokenizer, target_dir):
    draft = save_tiny_model(tmp_path / "draft", "gpt2", tokenizer, seed=7)  # another architecture is fine
    info = check_draft(target_dir, draft)
    assert (info.vocab_size, info.tokens) == (len(tokenizer), len(tokenizer))
    assert (info.bos_token_id, info.eos_token_ids, info.pad_token_id) == \
        (tokenizer.bos_token_id, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    loaded = check_draft(AutoModelForCausalLM.from_pretrained(target_dir), AutoModelForCausalLM.from_pretrained(draft),
                         target_tokenizer=tokenizer, draft_tokenizer=tokenizer)
    assert loaded == info  # loaded models and directories are checked alike


def test_different_vocab_size_is_refused(tmp_path, tokenizer, target_dir):
    padded = save_tiny_model(tmp_path / "padded", "llama", tokenizer, vocab=len(tokenizer) + 8)
    with pytest.raises(DraftMismatch, match=rf"vocab_size differs: target {len(tokenizer)}, draft {len(tokenizer) + 8} "
                                            r"\(vLLM requires equal vocabulary sizes"):
        check_draft(target_dir, padded)
    assert check_draft(target_dir, padded, equal_vocab_size=False).tokens == len(tokenizer)  # potstill's own decoder


def test_embedding_rows_other_than_vocab_size_are_refused(tokenizer, target_dir, model_dirs):
    draft = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2_student"])
    draft.transformer.wte = torch.nn.Embedding(len(tokenizer) + 3, draft.config.n_embd)  # config left at the old size
    with pytest.raises(DraftMismatch, match=rf"the draft has {len(tokenizer) + 3} input embedding rows but config "
                                            rf"vocab_size {len(tokenizer)}"):
        check_draft(target_dir, draft, draft_tokenizer=tokenizer)


def test_a_different_tokenizer_is_refused(tmp_path, tokenizer, target_dir):
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "zebra"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                    unk_token="<unk>")
    draft = save_tiny_model(tmp_path / "other", "llama", other, vocab=len(tokenizer))
    with pytest.raises(DraftMismatch, match=r"tokenizers differ: vocabularies differ \(479 vs 7 tokens\): .*only in the "
                                            r"target's.*only in the draft's \('zebra'\)"):
        check_draft(target_dir, draft)


def test_a_different_tokenizer_eos_is_refused(tmp_path, tokenizer, target_dir):
    draft = save_tiny_model(tmp_path / "draft", "llama", tokenizer)
    changed = AutoTokenizer.from_pretrained(draft)
    changed.eos_token = changed.bos_token
    changed.save_pretrained(draft)
    with pytest.raises(DraftMismatch, match=rf"tokenizers differ: eos_token_id differs: target {tokenizer.eos_token_id}, "
                                            rf"draft {tokenizer.bos_token_id}"):
        check_draft(target_dir, draft)


@pytest.mark.parametrize("name", ["bos_token_id", "eos_token_id", "pad_token_id"])
def test_different_special_ids_in_the_model_config_are_refused(tmp_path, tokenizer, target_dir, name):
    draft = save_tiny_model(tmp_path / "draft", "llama", tokenizer, **{name: 7})
    target_value = getattr(tokenizer, name)
    with pytest.raises(DraftMismatch, match=rf"config {name} differs: target \[{target_value}\], draft \[7\]"):
        check_draft(target_dir, draft)


def test_a_different_generation_eos_is_refused(tmp_path, tokenizer, target_dir):
    draft_dir = save_tiny_model(tmp_path / "draft", "llama", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(draft_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 9]  # e.g. an end-of-turn token added to one only
    model.save_pretrained(draft_dir)
    with pytest.raises(DraftMismatch, match=rf"generation_config eos_token_id differs: target \[{tokenizer.eos_token_id}\], "
                                            rf"draft \[{tokenizer.eos_token_id}, 9\]"):
        check_draft(target_dir, draft_dir)


def test_every_problem_is_named_in_one_line(tmp_path, tokenizer, target_dir):
    draft = save_tiny_model(tmp_path / "draft", "llama", tokenizer, vocab=len(tokenizer) + 1, pad_token_id=5)
    with pytest.raises(DraftMismatch) as err:
        check_draft(target_dir, draft)
    message = str(err.value)
    assert "\n" not in message and "vocab_size differs" in message and "config pad_token_id differs" in message


def test_bad_arguments(tmp_path, tokenizer, target_dir):
    with pytest.raises(FileNotFoundError, match=r"draft '.*missing': model directory has no config.json"):
        check_draft(target_dir, tmp_path / "missing")
    with pytest.raises(ValueError, match="pass draft_tokenizer with a loaded draft model"):
        check_draft(target_dir, AutoModelForCausalLM.from_pretrained(target_dir))
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    with pytest.raises(ValueError, match="gamma must be ≥ 1"):
        configure_hf_assistant(model, 0)
    configured = configure_hf_assistant(model, 5).generation_config
    assert (configured.num_assistant_tokens, configured.num_assistant_tokens_schedule,
            configured.assistant_confidence_threshold) == (5, "constant", 0.0)
