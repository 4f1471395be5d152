"""The built-in teacher: where it lives and the recipe it was trained with (data only, no training code).

It ships as package data (``assets/teacher``): a small Llama trained by potstill itself (objective `ce`) on the
built-in language. ``python -m potstill.builtin.build_teacher --out DIR`` reproduces it; that module holds the
training, so loading the teacher never imports the training loop. If the shipped copy is missing (e.g. a slim
install), a copy rebuilt into ``$POTSTILL_CACHE`` (default ``~/.cache/potstill``), in a directory named after the
recipe's hash, is used instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHIPPED = Path(__file__).parent / "assets" / "teacher"
MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "tie_word_embeddings": True, "rope_theta": 10000.0}
TRAIN = {"max_steps": 600, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100, "schedule": "cosine", "seed": 1234,
         "log_every": 50, "eval_every": 200, "save_every": 0, "keep_checkpoints": 0}
THREADS = 2
DATA = {"train": "builtin", "max_length": 128, "max_eval_examples": 256}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps([MODEL, TRAIN, DATA], sort_keys=True).encode()).hexdigest()[:12]


def is_complete(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()


def cache_root() -> Path:
    return Path(os.environ.get("POTSTILL_CACHE", Path.home() / ".cache" / "potstill"))


def rebuilt_dir() -> Path:
    return cache_root() / f"builtin-teacher-{recipe_hash()}"


def builtin_teacher_dir() -> Path:
    """The shipped teacher, else a rebuilt one; a clear error (with the command that rebuilds it) otherwise."""
    for path in (SHIPPED, rebuilt_dir()):
        if is_complete(path):
            return path
    raise FileNotFoundError(f"the built-in teacher is missing from this install ({SHIPPED}); rebuild it (about three "
                            f"minutes on two CPU cores) with: python -m potstill.builtin.build_teacher --out {rebuilt_dir()}")
