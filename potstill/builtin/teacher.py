"""The built-in teacher: a small Llama trained by potstill itself (objective `ce`) on the built-in language.

It ships as package data (``assets/teacher``); ``python -m potstill.builtin.teacher --out DIR`` reproduces it.
Training runs on a fixed number of CPU threads (THREADS) so that, on the same CPU type and torch build, the
result is bit-for-bit the same. If the
shipped copy is missing (e.g. a slim install), the teacher is trained on first use and cached under
``$POTSTILL_CACHE`` (default ``~/.cache/potstill``) in a directory named after the recipe's hash.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

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


def builtin_teacher_dir() -> Path:
    """The shipped teacher, else a cached one, else train it now (about three minutes on two CPU cores)."""
    if is_complete(SHIPPED):
        return SHIPPED
    cached = cache_root() / f"builtin-teacher-{recipe_hash()}"
    if not is_complete(cached):
        build_teacher(cached)
    return cached


def initial_model_dir(path: Path) -> None:
    """A freshly initialised model (seeded) next to the built-in tokenizer: the starting point of training."""
    from potstill.builtin.tokenizer import build_tokenizer
    from potstill.models import model_from_config

    tokenizer = build_tokenizer(path)
    torch.manual_seed(TRAIN["seed"])
    config = {**MODEL, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model_from_config(config).save_pretrained(path, safe_serialization=True)


def build_teacher(out: Path, progress: bool = True) -> Path:
    """Train the teacher from scratch and move it into ``out`` atomically."""
    from potstill.config import RunConfig
    from potstill.train import distill

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # a fixed thread count fixes the float summation order
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.build-"))
    try:
        initial_model_dir(work / "init")
        cfg = RunConfig.from_dict({"student": {"path": str(work / "init")}, "data": DATA,
                                   "loss": {"objective": "ce"}, "train": TRAIN, "out_dir": str(work / "run"),
                                   "device": "cpu"})
        result = distill(cfg, progress=progress)
        final = result.final_dir
        shutil.rmtree(final / "potstill", ignore_errors=True)
        (final / "RECIPE.json").write_text(json.dumps({"model": MODEL, "train": TRAIN, "data": DATA,
                                                       "recipe_hash": recipe_hash(), "metrics": result.metrics}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Reproduce the built-in teacher (shipped in assets/teacher).")
    parser.add_argument("--out", type=Path, default=SHIPPED, help="where to write the teacher directory")
    args = parser.parse_args()
    path = build_teacher(args.out)
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    print(f"teacher written to {path}; model.safetensors sha256 {digest}")


if __name__ == "__main__":
    main()
