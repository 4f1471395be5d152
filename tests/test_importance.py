"""Sampler log-probs of a rollout batch: aligned with its labels, they give ρ = 1 for the student's own samples at
T = 1, and the correction for another sampler — through the loop's batch_loss, as a rollout batch reaches it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from potstill.data.batches import collate
from potstill.data.encode import Example
from potstill.importance import SAMPLER_LOGPROBS, aligned_sampler_logprobs
from potstill.labels import IGNORE_INDEX
from potstill.sampling import SamplingSettings, sample
from potstill.train import shifted, shifted_sampler_logprobs


def _rollout_batch(model, settings, seed=0):
    """Prompts + sampled tokens collated as onpolicy/rollouts.py does, with the sampler's log-probs attached."""
    prompts = [[1, 20, 31], [1, 7], [1, 44, 9, 12]]
    out = sample(model, prompts, settings, eos_ids=[2], pad_id=0, seed=seed)
    batch = collate([Example(i, p + t, [IGNORE_INDEX] * len(p) + t) for i, (p, t) in enumerate(zip(prompts, out.tokens))], 0)
    batch[SAMPLER_LOGPROBS] = aligned_sampler_logprobs(prompts, out.logprobs, batch["input_ids"].shape[1])
    return batch


def _student_label_logprobs(model, batch):
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = shifted(batch)
    return F.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1), labels != IGNORE_INDEX


def test_the_students_own_samples_at_t1_give_rho_one(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2_student"]).eval()
    batch = _rollout_batch(model, SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0))
    logq, labelled = _student_label_logprobs(model, batch)
    sampler = shifted_sampler_logprobs(batch)
    assert labelled.sum() >= 6
    # two forwards (KV-cached steps vs one pass) differ by fp32 reassociation of the logits: an error on the scale
    # of the log-probs, so the absolute part is sized to their magnitude
    scale = 1e-5 * logq[labelled].abs().max().item()
    torch.testing.assert_close(sampler[labelled], logq[labelled], rtol=1e-5, atol=scale)  # ρ = q/q_sampler = 1
    assert (sampler[~labelled] == 0).all()


def test_another_temperature_is_corrected_by_rho(model_dirs):
    """Sampled at T = 0.5, the sampler's log-prob is log softmax(z/0.5)(y), not the student's log q(y) at T = 1."""
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2_student"]).eval()
    batch = _rollout_batch(model, SamplingSettings(max_new_tokens=6, temperature=0.5, top_p=1.0))
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = shifted(batch)
    labelled = labels != IGNORE_INDEX
    cold = F.log_softmax(logits / 0.5, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    torch.testing.assert_close(shifted_sampler_logprobs(batch)[labelled], cold[labelled], rtol=1e-5,
                               atol=1e-5 * cold[labelled].abs().max().item())  # scale: see the test above
    logq, _ = _student_label_logprobs(model, batch)
    assert not torch.allclose(logq[labelled], cold[labelled], rtol=1e-3)  # so ρ ≠ 1 here


def test_a_row_longer_than_the_batch_is_refused():
    with pytest.raises(ValueError, match="rollout row 0: 2 prompt \\+ 3 new tokens exceed the batch width 4"):
        aligned_sampler_logprobs([[1, 2]], [[-1.0, -2.0, -3.0]], 4)
