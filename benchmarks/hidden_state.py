"""Hidden-state + logit KD vs logit KD alone at equal budget on the built-in default.

    python benchmarks/hidden_state.py                         # every arm, seeds 0 1, the quickstart's 300 steps
    python benchmarks/hidden_state.py --steps 100 --seeds 0 --arms fresh/fkl fresh/fkl+mse

Every run uses configs/quickstart.yaml (the shipped 4-block, 128-wide teacher; same data order, steps, batch, lr and
seed per pair of arms); only the hidden.* keys (and, for `subset/`, the student) change. Two students:
  fresh/   the quickstart's fresh 2-block, 64-wide Llama (projections 64 → 128)
  subset/  the teacher's first 2 blocks (student.init_from_teacher_layers=2; equal widths, so projection none works)
One torch thread. Prints a markdown table of held-out CE, KL(teacher‖student) and top-1 agreement per arm and seed,
and the mean over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from potstill.config import RunConfig
from potstill.quickstart import CONFIG
from potstill.train import distill

SUBSET = ["student.config=null", "student.init_from_teacher_layers=2"]
HIDDEN_MSE = ["hidden.weight=1", "hidden.objective=mse"]
RELATIONS = ["hidden.attention_relations.weight=1", "hidden.attention_relations.heads=4"]
ARMS = {
    "fresh/fkl": [],
    "fresh/fkl+mse": HIDDEN_MSE,
    "fresh/fkl+mse(orthogonal)": HIDDEN_MSE + ["hidden.projection=orthogonal"],
    "fresh/fkl+mse(w=0.1)": ["hidden.weight=0.1", "hidden.objective=mse"],
    "fresh/fkl+cosine": ["hidden.weight=1", "hidden.objective=cosine"],
    "fresh/fkl+relations": RELATIONS,
    "subset/fkl": SUBSET,
    "subset/fkl+mse": SUBSET + HIDDEN_MSE + ["hidden.projection=none"],
    "subset/fkl+relations": SUBSET + RELATIONS,
}
METRICS = ("student_ce", "kl_teacher_student", "top1_agreement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=None, help="default: the quickstart's")
    parser.add_argument("--out", type=Path, default=Path("runs/hidden_state"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[tuple[dict, float]]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            overrides = [*ARMS[arm], f"train.seed={seed}", f"out_dir={args.out / arm / f'seed{seed}'}",
                         "train.eval_every=0", "train.log_every=50", "eval.max_new_tokens=1"]
            if args.steps:
                overrides.append(f"train.max_steps={args.steps}")
            cfg = RunConfig.from_yaml(CONFIG, overrides)
            start = time.perf_counter()
            metrics = distill(cfg, overwrite=True, progress=False).metrics
            results.setdefault(arm, []).append((metrics, time.perf_counter() - start))
            print(f"{arm} seed {seed}: held-out CE {metrics['student_ce']:.4f}, KL {metrics['kl_teacher_student']:.4f} "
                  f"({results[arm][-1][1]:.0f} s)", flush=True)
    print(f"\nbuilt-in default, {cfg.train.max_steps} steps x {cfg.train.batch_size} documents, seeds {args.seeds}; "
          f"teacher held-out CE {metrics.get('teacher_ce', float('nan')):.4f}\n")
    print("| arm | held-out CE | KL(teacher‖student) | top-1 agreement | per seed: CE | wall s |")
    print("|---|---:|---:|---:|---|---:|")
    for arm, runs in results.items():
        means = [statistics.mean(m[k] for m, _ in runs) for k in METRICS]
        per_seed = ", ".join(f"{m['student_ce']:.4f}" for m, _ in runs)
        seconds = statistics.mean(s for _, s in runs)
        print(f"| `{arm}` | {means[0]:.4f} | {means[1]:.4f} | {means[2]:.4f} | {per_seed} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
