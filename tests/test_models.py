"""models.check_plain_head: the fused loss projects h·Wᵀ + b itself, so a model whose logits are anything else
must be refused at load — detected by behaviour (one probe forward), not by a list of config field names."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig,
                          Qwen2Config)

from potstill.models import check_plain_head, load_causal_lm

from conftest import tiny_config

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_plain_heads_pass(arch):
    check_plain_head(build(tiny_config(arch, 97)))


def test_tied_and_biased_heads_pass():
    check_plain_head(build(LlamaConfig(**SMALL, tie_word_embeddings=True)))
    model = build(Qwen2Config(**SMALL))
    model.lm_head.bias = torch.nn.Parameter(torch.randn(97))  # a head with a bias is still h·Wᵀ + b
    check_plain_head(model)


def test_bf16_model_passes():
    check_plain_head(build(LlamaConfig(**SMALL)).to(torch.bfloat16))


@pytest.mark.parametrize("config, what", [
    (Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0), "post-processes its logits"),
    (CohereConfig(**SMALL, logit_scale=0.0625), "post-processes its logits"),
    (GraniteConfig(**SMALL, logits_scaling=4.0), "post-processes its logits"),
])
def test_post_processing_heads_are_refused(config, what):
    with pytest.raises(NotImplementedError, match=what):
        check_plain_head(build(config))


def test_soft_capping_is_seen_even_when_random_logits_are_tiny():
    model = build(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0))
    ids = torch.arange(8)[None]
    assert model(input_ids=ids).logits.abs().max() < 1.0  # where tanh-capping at 30 is invisible without the probe
    with pytest.raises(NotImplementedError):
        check_plain_head(model)


def test_hidden_state_transform_before_head_is_refused():
    """MiniCPM-style: hidden states scaled between the decoder body and the head."""
    model = build(LlamaConfig(**SMALL))
    model.lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    with pytest.raises(NotImplementedError, match="transforms its last hidden states"):
        check_plain_head(model)


def test_probe_leaves_the_model_as_it_was():
    model = build(LlamaConfig(**SMALL, attention_dropout=0.3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_plain_head(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.lm_head._forward_hooks


def test_refused_at_load(tmp_path):
    build(CohereConfig(**SMALL, logit_scale=0.0625)).save_pretrained(tmp_path / "cohere")
    with pytest.raises(NotImplementedError, match="CohereForCausalLM post-processes its logits"):
        load_causal_lm(str(tmp_path / "cohere"))
