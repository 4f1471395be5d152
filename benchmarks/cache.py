"""Teacher-logit cache on the built-in default: bytes per token per mode, build throughput, step time of cached
KD vs plain CE vs live-teacher KD, and student quality at equal budget.

    python benchmarks/cache.py                      # quickstart recipe (300 steps x 16 documents per student)
    python benchmarks/cache.py --steps 100 --modes topk:8 sample:16

Every student uses configs/quickstart.yaml with objective `fkl` (the cache runs read the teacher signal from
disk and never load the teacher); `ce` and live `fkl` are the baselines. Step time = mean over logged steps of
tokens ÷ tokens_per_s, excluding the first logged step (warm-up).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from potstill.config import RunConfig
from potstill.quickstart import CONFIG
from potstill.cache.run import build_from_config
from potstill.train import distill

DEFAULT_MODES = ["dense", "topk:8", "topk:32", "sample:16", "sample:64"]


def step_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"][1:]
    return sum(r["tokens"] / r["tokens_per_s"] for r in train) / len(train)


def run(name: str, overrides: list[str], out: Path, steps: int | None) -> tuple[dict, float]:
    extra = [f"out_dir={out / name}", "train.eval_every=0", "train.log_every=1"] + ([f"train.max_steps={steps}"] if steps else [])
    result = distill(RunConfig.from_yaml(CONFIG, overrides + extra), overwrite=True, progress=False)
    return result.metrics, step_seconds(result.run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="*", default=DEFAULT_MODES, help="dense | topk:K | sample:K")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/cache-bench"))
    parser.add_argument("--objective", default="fkl", help="objective of the cache-trained students")
    parser.add_argument("--no-baselines", action="store_true", help="skip the CE-only and live-teacher runs (quick iteration)")
    args = parser.parse_args()
    rows = []
    if args.no_baselines:
        ce, ce_step, live, live_step = {"student_ce": float("nan"), "ece": float("nan")}, float("nan"), {"student_ce": float("nan"), "ece": float("nan")}, float("nan")
    else:
        ce, ce_step = run("ce", ["loss.objective=ce"], args.out, args.steps)
        live, live_step = run("live-fkl", [], args.out, args.steps)
    for mode in args.modes:
        kind, _, size = mode.partition(":")
        cache = args.out / f"cache-{kind}{size}"
        size_key = {"topk": "cache.k", "sample": "cache.samples"}.get(kind)
        build = [f"teacher.cache={cache}", f"cache.mode={kind}"] + ([f"{size_key}={size}"] if size_key else [])
        shutil.rmtree(cache, ignore_errors=True)  # a fresh build each time: a resumed one would skip every shard
        summary = build_from_config(RunConfig.from_yaml(CONFIG, build, check_run=False), progress=False)
        metrics, step = run(f"from-{kind}{size}", [f"teacher.cache={cache}", "teacher.path=", f"loss.objective={args.objective}"],
                            args.out, args.steps)
        rows.append((mode, summary, metrics, step))
        print(f"{mode}: {summary['bytes_per_position']:.1f} B/token, CE {metrics['student_ce']:.4f}", flush=True)
    print(f"\nbuilt-in default, V=479; baselines: CE-only held-out CE {ce['student_ce']:.4f} (step {ce_step * 1000:.1f} ms), "
          f"live-teacher FKL {live['student_ce']:.4f} (step {live_step * 1000:.1f} ms, ECE {live['ece']:.4f})\n")
    print("| cache | bytes/token | build tokens/s | held-out CE | ECE | step ms | ÷ CE step | ÷ live KD step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, s, m, step in rows:
        print(f"| {mode} | {s['bytes_per_position']:.1f} | {s['positions_per_s']:,.0f} | {m['student_ce']:.4f} | {m['ece']:.4f} "
              f"| {step * 1000:.1f} | {step / ce_step:.2f} | {step / live_step:.2f} |")


if __name__ == "__main__":
    main()
