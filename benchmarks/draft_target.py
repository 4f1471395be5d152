"""A target where speculative decoding should win on CPU: a larger Llama trained on the built-in language with
potstill's own loop and the shipped teacher's recipe (``potstill/builtin/teacher.py``: TRAIN, DATA, objective `ce`),
only the model is bigger (8 layers, hidden 256: ~6.4M parameters, a single-token KV-cached forward ~4x the shipped
4-layer teacher's and ~10x a 1-layer draft's at batch 1 on one thread).

    python benchmarks/draft_target.py --out runs/spec/target [--steps 600] [--batch 32] [--threads 1]

On a shared CPU use one thread: with two OpenMP threads and other jobs on the two cores, every parallel region
waits for a descheduled thread (a 2-thread run here fell from 2,300 to ~100 tokens/s under load average 5).

Writes the model to OUT/model (an HF dir with the built-in tokenizer), the run to OUT/run and OUT/summary.json
(wall time, held-out CE / golden KL on the built-in validation text for it and the shipped teacher).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from potstill.builtin.build_teacher import initial_model_dir
from potstill.builtin.teacher import DATA, MODEL, TRAIN, builtin_teacher_dir
from potstill.config import RunConfig
from potstill.evaluate_run import evaluate_path
from potstill.models import model_from_config
from potstill.train import distill

TARGET_MODEL = {**MODEL, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8,
                "num_attention_heads": 8, "num_key_value_heads": 4}


def initial_target(path: Path) -> Path:
    """The seeded, untrained target next to the built-in tokenizer (the shipped teacher's tokenizer files)."""
    return initial_model_dir(path, TARGET_MODEL)


def text_metrics(model_dir: Path) -> dict:
    row = evaluate_path(model_dir, data="builtin")
    return {k: row[k] for k in ("student_ce", "golden_kl_student")}


def train_target(out: Path, steps: int, batch: int, threads: int) -> dict:
    out = Path(out)
    torch.set_num_threads(threads)
    init = initial_target(out / "init")
    train = {**TRAIN, "max_steps": steps, "batch_size": batch, "warmup_steps": min(TRAIN["warmup_steps"], steps // 6),
             "report_to": "none"}
    cfg = RunConfig.from_dict({"student": {"path": str(init)}, "data": DATA, "loss": {"objective": "ce"},
                               "train": train, "out_dir": str(out / "run"), "device": "cpu"})
    started = time.perf_counter()
    result = distill(cfg, overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.copytree(result.final_dir, out / "model", ignore=shutil.ignore_patterns("potstill"))
    params = sum(p.numel() for p in model_from_config(str(out / "model" / "config.json")).parameters())
    summary = {"model": TARGET_MODEL, "parameters": params, "train": train, "data": DATA, "threads": threads,
               "train_seconds": round(seconds, 1), "text": text_metrics(out / "model"),
               "shipped_teacher_text": text_metrics(builtin_teacher_dir())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=TRAIN["max_steps"])
    parser.add_argument("--batch", type=int, default=TRAIN["batch_size"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(train_target(args.out, args.steps, args.batch, args.threads), indent=2))


if __name__ == "__main__":
    main()
