"""Shared fixtures: tiny random HF models of two architectures saved to local dirs with the built-in tokenizer,
so every test exercises the real from_pretrained loading path, offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from potstill.builtin import builtin_texts
from potstill.builtin.tokenizer import build_tokenizer


def tiny_config(arch: str, vocab: int, layers: int = 2, hidden: int = 32):
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                          bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    raise ValueError(arch)


def save_tiny_model(path: Path, arch: str, tokenizer, layers: int = 2, hidden: int = 32, vocab: int | None = None,
                    seed: int = 0, with_tokenizer: bool = True, **config) -> Path:
    """A random model saved like a hub checkpoint. transformers 5 loads any tokenizer in a qwen2 directory as
    Qwen2Tokenizer (which mangles our word-level one), so qwen2 students are saved without one and borrow the
    teacher's — the guardrail test below shows what happens otherwise."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab or len(tokenizer), layers, hidden)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    for key, value in config.items():  # e.g. attention_dropout=0.5
        setattr(cfg, key, value)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "llama_teacher": save_tiny_model(root / "llama_teacher", "llama", tokenizer, layers=3, hidden=48, seed=1),
        "qwen2_student": save_tiny_model(root / "qwen2_student", "qwen2", tokenizer, seed=2, with_tokenizer=False),
        "gpt2_teacher": save_tiny_model(root / "gpt2_teacher", "gpt2", tokenizer, layers=3, hidden=48, seed=3),
        "gpt2_student": save_tiny_model(root / "gpt2_student", "gpt2", tokenizer, seed=4),
    }


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts("train", 300)))
    return path


@pytest.fixture(scope="session")
def dropout_student(tmp_path_factory, tokenizer) -> Path:
    """A Llama student with attention dropout 0.5: its training losses depend on the torch RNG stream."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama_dropout", "llama", tokenizer, seed=5,
                           attention_dropout=0.5)


def after_load(monkeypatch, hook):
    """Run ``hook(parts)`` on the real loaded parts inside distill (to attach forward hooks to the real models)."""
    from potstill import train

    real = train.load_parts

    def load(cfg, device):
        parts = real(cfg, device)
        hook(parts)
        return parts

    monkeypatch.setattr(train, "load_parts", load)


def seams(parts):
    """The single-process forward seams the loop calls (runtime.parallelize on one CPU rank wraps nothing)."""
    import torch

    from potstill import runtime

    return runtime.parallelize(runtime.Runtime(torch.device("cpu")), parts.student, (parts.teacher, parts.reference),
                               parts.vocab, make_seam=parts.hidden.make_seam if parts.hidden is not None else None)


def builtin_prompt_completion_jsonl(path: Path, n: int, prompt_words: int, completion_words: int,
                                    privileged: bool = False) -> Path:
    """prompt/completion records cut from the first ``n`` built-in training texts (with ``privileged``, the
    completion is also the record's privileged_context)."""
    rows = []
    for text in builtin_texts("train", n):
        words = text.split()
        completion = " ".join(words[prompt_words: prompt_words + completion_words])
        row = {"prompt": " ".join(words[:prompt_words]), "completion": " " + completion}
        rows.append({**row, "privileged_context": completion} if privileged else row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def simulate_crash(run_dir: Path, lost_checkpoint: int, logged_until: int) -> None:
    """A run that died after logging step ``logged_until``: its step-``lost_checkpoint`` checkpoint and final/ were
    never written, and metrics.jsonl holds the lines up to ``logged_until``."""
    shutil.rmtree(run_dir / "checkpoints" / f"step-{lost_checkpoint:07d}")
    shutil.rmtree(run_dir / "final")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= logged_until) + "\n")
