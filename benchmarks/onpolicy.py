"""On-policy distillation step throughput: potstill (`data.regime=onpolicy`, λ = 1) vs TRL's DistillationTrainer
and GKDTrainer (lmbda = 1), on the same tiny models and settings, on CPU, one child process per side.

TRL is not a potstill dependency; it lives in a separate environment, made once with:

    python3 -m venv /work/trlenv && /work/trlenv/bin/pip install torch==2.13.0 transformers==5.23.0 \\
        accelerate==1.15.0 trl==1.16.0

Run (from the repository root, with potstill's environment):

    python benchmarks/onpolicy.py --trl-python /work/trlenv/bin/python [--steps 23 --warmup 3 --batch-size 8
        --max-new-tokens 64 --threads 2 --beta 0.5 --repeats 3 --sides potstill,distillation,gkd]

(`--sides potstill` needs no TRL; without TRL the other sides are refused with the command above.) In TRL 1.16
`trl.DistillationTrainer` is always on-policy (it has no λ: every step samples from the student) and
`trl.experimental.gkd.GKDTrainer` is run with lmbda = 1; both use TRL's generalized JSD with the same beta.

What is the same on every side: teacher = the shipped built-in teacher (Llama, 4 layers × 128 hidden,
V = 479); student = a fresh Llama (2 × 64, seed 0) saved once to a temp dir, loaded by every side; the same
tokenizer; the same chat prompts (built-in addition problems with 3-digit numbers, so every prompt has the same
token count and no row is padded); batch size, max new tokens, temperature 1, GJSD(beta) on every generated
token, constant learning rate, AdamW, grad-norm clip 1, fp32, the thread count, the number of steps. EOS is held
off on every side (TRL: `min_new_tokens = max_new_tokens`; potstill: the same on its sampling settings), so every
row generates exactly max_new_tokens and the sides do the same work per step; each side reports the tokens it
generated per step, and the table says if they differ. Sides run one after another (never at once: they would
share the cores), `--repeats` times in round-robin order; the table shows each side's fastest run (the least
disturbed by other jobs) and its median steps per CPU-second, and the 1-minute load average seen between runs.
Timing (`onpolicy_clock.py`): a step is the interval between consecutive step ends, after `--warmup` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from potstill.builtin.arithmetic import arithmetic_examples
from potstill.builtin.teacher import builtin_teacher_dir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from onpolicy_clock import RESULT_PREFIX  # noqa: E402

TRL_ENV_HELP = ("python3 -m venv /work/trlenv && /work/trlenv/bin/pip install torch==2.13.0 transformers==5.23.0 "
                "accelerate==1.15.0 trl==1.16.0")
SIDES = {"potstill": "onpolicy_potstill.py", "distillation": "onpolicy_trl.py", "gkd": "onpolicy_trl.py"}


def save_student(teacher_dir: Path, out: Path, layers: int, hidden: int, seed: int) -> Path:
    """A fresh Llama student sharing the teacher's tokenizer and special ids (the teacher's tokenizer files are
    copied beside it)."""
    teacher = LlamaConfig.from_pretrained(teacher_dir)
    config = LlamaConfig(vocab_size=teacher.vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=teacher.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=teacher.bos_token_id, eos_token_id=teacher.eos_token_id,
                         pad_token_id=teacher.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).write_bytes((teacher_dir / name).read_bytes())
    return out


def write_prompts(path: Path, n: int) -> Path:
    """Chat records {"messages": [user, assistant]}: TRL's GKD collator wants messages, its DistillationTrainer
    the user turn as the prompt; potstill samples after the user turn. 3-digit numbers: equal prompt lengths."""
    lines = [json.dumps({"messages": [{"role": "user", "content": ex["prompt"]},
                                      {"role": "assistant", "content": ex["completion"].strip()}]})
             for ex in arithmetic_examples("train", n, seed=0, digits=(3, 3))]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_side(side: str, python: str, settings: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    cmd = [python, str(HERE / SIDES[side]), *([side] if SIDES[side] == "onpolicy_trl.py" else []), str(settings)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in done.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not results:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"error: side {side} failed (exit {done.returncode}): {' '.join(cmd)}")
    return results[0]


def check_trl(python: str) -> str:
    try:
        probe = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    except OSError:  # no such interpreter
        probe = None
    if probe is None or probe.returncode != 0:
        raise SystemExit(f"error: TRL is not importable by {python}; create its environment with: {TRL_ENV_HELP} "
                         f"(or run with --sides potstill)")
    return probe.stdout.strip()


def best_and_cpu(runs: list[dict]) -> tuple[dict, float]:
    """A side's repeats → (its fastest run by wall clock, its median steps per CPU-second). On a machine shared
    with other jobs the fastest run is the least disturbed one; CPU time is inflated less by the load."""
    cpu = sorted(r["steps_per_cpu_s"] for r in runs)[(len(runs) - 1) // 2]
    return max(runs, key=lambda r: r["steps_per_s"]), cpu


def table(results: dict[str, list[dict]], settings: dict) -> str:
    rows = ["| side | steps/s, each run | best steps/s | steps per CPU-s (median) | generated tokens/s (best) | "
            "prompt + new tokens/row | rollout share | teacher share | potstill ÷ side: best, CPU |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ours = best_and_cpu(results["potstill"]) if "potstill" in results else None
    for runs in results.values():
        (r, cpu) = best_and_cpu(runs)
        ratio = f"{ours[0]['steps_per_s'] / r['steps_per_s']:.2f}x, {ours[1] / cpu:.2f}x" if ours else "—"
        each = ", ".join(f"{x['steps_per_s']:.2f}" for x in runs)
        new = "/".join(str(n // settings["batch_size"]) for n in r["new_tokens_per_step"])
        rows.append(f"| {r['side']} | {each} | {r['steps_per_s']:.2f} | {cpu:.2f} | {r['tokens_per_s']:.0f} | "
                    f"{'/'.join(map(str, r['prompt_tokens']))} + {new} | {r['rollout_share']:.0%} | "
                    f"{r['teacher_share']:.0%} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="potstill,distillation,gkd")
    parser.add_argument("--trl-python", default="/work/trlenv/bin/python")
    parser.add_argument("--potstill-python", default=sys.executable)
    parser.add_argument("--steps", type=int, default=23, help="steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (≥ 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.5, help="GJSD beta (TRL's beta; potstill gjsd(beta=...))")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, in round-robin order; the table "
                        "shows each side's fastest run and its median CPU-time rate")
    args = parser.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"error: unknown side(s) {unknown}; choose from {sorted(SIDES)}")
    if any(s != "potstill" for s in sides):
        print(f"TRL {check_trl(args.trl_python)} at {args.trl_python}")
    with tempfile.TemporaryDirectory(prefix="onpolicy-bench-") as tmp:
        root, teacher_dir = Path(tmp), builtin_teacher_dir()
        settings = {"teacher_dir": str(teacher_dir), "batch_size": args.batch_size,
                    "student_dir": str(save_student(teacher_dir, root / "student", args.student_layers,
                                                    args.student_hidden, args.seed)),
                    "data": str(write_prompts(root / "prompts.jsonl", args.batch_size * args.steps * 2)),
                    "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "beta": args.beta, "lr": args.lr,
                    "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "seed": args.seed}
        results: dict[str, list[dict]] = {side: [] for side in sides}
        loads = [os.getloadavg()[0]]
        for repeat in range(args.repeats):  # round robin, so that a change in machine load hits every side
            for side in sides:
                path = root / f"settings-{side}-{repeat}.json"
                path.write_text(json.dumps({**settings, "out_dir": str(root / f"run-{side}-{repeat}")}))
                python = args.potstill_python if side == "potstill" else args.trl_python
                results[side].append(run_side(side, python, path, args.threads))
                loads.append(os.getloadavg()[0])
                print(json.dumps({"repeat": repeat, **results[side][-1], "load_after": loads[-1]}), flush=True)
    print(f"\n1-min load average between runs: {min(loads):.2f}–{max(loads):.2f}; settings: "
          f"{json.dumps({k: v for k, v in vars(args).items() if 'python' not in k})}\n")
    print(table(results, settings))


if __name__ == "__main__":
    main()
