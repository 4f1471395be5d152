"""Train one student per objective on the built-in default at equal budget and tabulate the results.

    python benchmarks/objectives.py                       # the quickstart recipe, 300 steps per student
    python benchmarks/objectives.py --steps 100 --objectives fkl rkl

Every run uses configs/quickstart.yaml (same teacher, student size, seed, data order and token budget); only
loss.objective changes. Prints a markdown table: held-out CE, KL(teacher‖student), top-1 agreement and ECE.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from potstill.config import RunConfig
from potstill.quickstart import CONFIG
from potstill.train import distill

DEFAULT = ["ce", "fkl", "rkl", "gjsd(beta=0.5)", "skl(alpha=0.1)", "srkl(alpha=0.1)", "tvd", "akl", "taid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="*", default=DEFAULT)
    parser.add_argument("--steps", type=int, default=None, help="default: the quickstart's")
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("overrides", nargs="*", default=[], help="extra section.key=value overrides for every run")
    args = parser.parse_args()
    rows = []
    for objective in args.objectives:
        name = objective.split("(")[0]
        overrides = [f"loss.objective={objective}", f"out_dir={args.out / name}", "train.eval_every=0", *args.overrides]
        if args.steps:
            overrides.append(f"train.max_steps={args.steps}")
        cfg = RunConfig.from_yaml(CONFIG, overrides)
        start = time.perf_counter()
        metrics = distill(cfg, overwrite=True, progress=False).metrics
        rows.append((objective, metrics, time.perf_counter() - start))
        print(f"{objective}: held-out CE {metrics['student_ce']:.4f} ({rows[-1][2]:.0f} s)", flush=True)
    steps = cfg.train.max_steps
    print(f"\nbuilt-in default, {steps} steps x {cfg.train.batch_size} documents per student, seed {cfg.train.seed}; "
          f"teacher held-out CE {rows[0][1].get('teacher_ce', float('nan')):.4f}\n")
    print("| objective | held-out CE | KL(teacher‖student) | top-1 agreement | ECE | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for objective, m, seconds in rows:
        print(f"| `{objective}` | {m['student_ce']:.4f} | {m['kl_teacher_student']:.4f} | {m['top1_agreement']:.4f} "
              f"| {m['ece']:.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
