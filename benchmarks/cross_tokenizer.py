"""Cross-tokenizer KD on the built-in default: the shipped word-level teacher distilled into a student with the
built-in byte-level BPE tokenizer (`builtin:bpe`), per objective, against a CE-only student at equal budget.

    python benchmarks/cross_tokenizer.py                                  # every arm, 300 steps each
    python benchmarks/cross_tokenizer.py --arms ce uld --steps 50         # a subset
    python benchmarks/cross_tokenizer.py --arms uld -- loss.temperature=2 # extra overrides for every arm

Every arm has the same student config, tokenizer, seed (so the same initial weights), data and order, steps,
batch and learning rate; only the objective changes (the CE-only arm has no teacher at all). The comparison is
held-out bits per byte, the one number comparable across tokenizers (docs/cross-tokenizer.md); the teacher's,
on its own tokens of the same text, is printed beside. One torch thread, so timings mean the same on a shared CPU.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from potstill.config import RunConfig
from potstill.quickstart import CONFIG
from potstill.train import distill

ARMS = {
    "ce": "ce",
    "uld": "uld",
    "alm": "alm",
    "gold": "gold",
    "ce+uld": "0.5*ce + uld",
    "ce+alm": "0.5*ce + alm",
    "ce+gold": "0.5*ce + gold",
    "xproj": "xproj",
    "ce+xproj": "0.5*ce + xproj",
}
BASE = ["student.tokenizer=builtin:bpe",
        "data.max_length=256",  # no built-in document is cut on either side: both models score the same bytes
        "train.eval_every=0", "train.report_to=none", "train.save_every=0"]


def arm_overrides(name: str, objective: str, out: Path, steps: int | None, extra: list[str]) -> list[str]:
    overrides = [*BASE, f"loss.objective={objective}", f"out_dir={out / name}", *extra]
    if objective == "ce":
        overrides.append("teacher.path=")  # CE-only: no teacher signal, and no teacher to compare tokenizers with
    if steps:
        overrides.append(f"train.max_steps={steps}")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=None, help="default: the quickstart's (300)")
    parser.add_argument("--out", type=Path, default=Path("runs/cross-tokenizer"))
    parser.add_argument("--objective", action="append", default=[], metavar="NAME=OBJECTIVE",
                        help="an extra arm, e.g. 'uld-t2=uld' with overrides after --")
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides for every arm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = {name: ARMS[name] for name in args.arms} | dict(a.split("=", 1) for a in args.objective)
    results, teacher = [], {}
    for name, objective in arms.items():
        cfg = RunConfig.from_yaml(CONFIG, arm_overrides(name, objective, args.out, args.steps, args.overrides))
        start = time.perf_counter()
        metrics = distill(cfg, overwrite=True, progress=False).metrics
        seconds = time.perf_counter() - start
        teacher = {k: metrics[k] for k in ("teacher_bpb", "teacher_ce", "teacher_tokens") if k in metrics} or teacher
        results.append((name, objective, metrics, seconds))
        print(f"{name} ({objective}): held-out bpb {metrics['bpb']:.4f} ({seconds:.0f} s)", flush=True)
    print_table(cfg, results, teacher)


def print_table(cfg: RunConfig, results: list, teacher: dict) -> None:
    base = next((m["bpb"] for name, _, m, _ in results if name == "ce"), None)
    print(f"\nbuilt-in default, student {cfg.student.config['num_hidden_layers']} layers × "
          f"{cfg.student.config['hidden_size']} with the BPE tokenizer ({cfg.train.max_steps} steps × "
          f"{cfg.train.batch_size} documents, lr {cfg.train.lr:g}, seed {cfg.train.seed}, T = {cfg.loss.temperature:g}); "
          f"held-out {results[0][2]['bytes']} bytes = {results[0][2]['tokens']} student tokens"
          + (f" = {teacher['teacher_tokens']} teacher tokens; teacher bpb {teacher['teacher_bpb']:.4f}" if teacher else "")
          + "\n")
    print("| arm | objective | held-out bpb | vs CE-only | student CE (nats/token) | wall s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, objective, m, seconds in results:
        ratio = f"{m['bpb'] / base:.4f}" if base else "—"
        print(f"| {name} | `{objective}` | {m['bpb']:.4f} | {ratio} | {m['student_ce']:.4f} | {seconds:.0f} |")
    if teacher:
        ratio = f"{teacher['teacher_bpb'] / base:.4f}" if base else "—"
        print(f"| teacher (word-level, own tokens) | — | {teacher['teacher_bpb']:.4f} | {ratio} | "
              f"{teacher['teacher_ce']:.4f} | — |")


if __name__ == "__main__":
    main()
