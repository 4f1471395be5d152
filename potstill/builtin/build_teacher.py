"""Reproduce the built-in teacher: train it with potstill's own loop from the recipe in ``teacher.py``.

Training runs on a fixed number of CPU threads (THREADS) so that, on the same CPU type and torch build, the
result is bit-for-bit the same. ``python -m potstill.builtin.build_teacher --out DIR``.
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

from potstill.builtin.teacher import DATA, MODEL, SHIPPED, THREADS, TRAIN, recipe_hash


def initial_model_dir(path: Path, model: dict = MODEL) -> Path:
    """A freshly initialised model (seeded; ``model``: the config without its vocabulary, the teacher's by
    default) next to the built-in tokenizer: the starting point of training."""
    from potstill.builtin.tokenizer import build_tokenizer
    from potstill.models import model_from_config

    tokenizer = build_tokenizer(path)
    torch.manual_seed(TRAIN["seed"])
    config = {**model, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model_from_config(config).save_pretrained(path, safe_serialization=True)
    return path


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
