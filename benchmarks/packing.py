"""Training throughput with and without data.packing on mixed-length data, same steps, same batches.

A JSONL of built-in documents, a quarter of them long (several documents joined, up to data.max_length) and the
rest short, so a padded batch is mostly padding; the built-in teacher distils into its first two layers. Reports
labelled tokens per second of step time (the loop's own `tokens_per_s`, summed over steps after a warm-up) and
the padding fraction (positions computed that hold no token).

    python benchmarks/packing.py [--steps 30] [--max-length 256] [--batch-size 16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

import potstill
from potstill.builtin import builtin_texts
from potstill.config import RunConfig


def mixed_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = builtin_texts("train", 4 * n)
    records = []
    for i in range(n):
        if i % 4 == 0:  # long: several documents joined (truncated to data.max_length when encoded)
            records.append(" ".join(docs[4 * i : 4 * i + 4]))
        else:  # short: the first few words of one
            words = docs[4 * i].split()
            records.append(" ".join(words[: rng.randint(8, 30)]))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    return path


def run(data: Path, out: Path, packing: bool, args) -> dict:
    cfg = RunConfig.from_yaml(None, ["teacher.path=builtin", "student.init_from_teacher_layers=2", f"data.train={data}",
                                     f"data.max_length={args.max_length}", "data.max_eval_examples=8",
                                     f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                                     "train.eval_every=0", "train.save_every=0", "train.log_every=1",
                                     "eval.max_new_tokens=3", "device=cpu", f"out_dir={out}", f"data.packing={packing}"])
    potstill.distill(cfg, progress=False)
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    timed = lines[args.warmup :]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"packing": packing, "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "padding": sum(r["padding"] for r in lines) / len(lines), "tokens": sum(r["tokens"] for r in lines),
            "final_loss": lines[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = mixed_jsonl(Path(tmp) / "mixed.jsonl", 2000)
        for rep in range(args.repeats):  # alternated, so that a change in machine load hits both alike
            for packing in (False, True):
                print(json.dumps({"repeat": rep, **run(data, Path(tmp) / f"run-{packing}-{rep}", packing, args)}))


if __name__ == "__main__":
    main()
