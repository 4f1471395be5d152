"""Offline vs sequence-level vs on-policy (λ = 0, 0.5, 1) vs self-distillation on the built-in default, at equal
optimizer steps (issue #14).

    python benchmarks/regimes.py --teacher RUN/model --out runs/regimes [--steps 300]

The teacher must add: `benchmarks/arithmetic_teacher.py` writes one (the shipped teacher fine-tuned on
`builtin:mixed`). Every run starts from the same student (the teacher's embeddings, first 2 blocks, norm and head)
and trains on the same prompts: `builtin:mixed` training records as prompt/completion pairs (addition problems with
their rationale; built-in language texts split after `PROMPT_WORDS` words), so each regime differs only in where the
trained completions come from and who scores them:

| regime | completions | teacher signal |
|---|---|---|
| offline | the data's | fkl, teacher-forced |
| sequence-level | the teacher's samples (`potstill generate`, T = 1) | label CE |
| on-policy λ | the student's samples with probability λ per step, else the data's | gjsd(β = 0.5) (GKD) |
| self-distillation | the student's samples (λ = 1) | gjsd(β = 0.5) against the student itself (live, or a frozen copy of the starting student) reading the reference rationale first (`privileged_context`) |

Each final student is evaluated against the same teacher on the built-in validation text (held-out CE, golden
KL(true ‖ student), proxy KL(teacher ‖ student)) and on built-in addition problems (greedy answer accuracy,
generation length, EOS rate). The golden and proxy curves over training (every `steps/6` steps) say whether the
proxy kept falling while the golden distance rose (teacher hacking). The table goes to stdout and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from potstill.builtin.sources import builtin_records
from potstill.config import RunConfig
from potstill.evaluate_run import evaluate_path
from potstill.generation.run import generate
from potstill.models import load_causal_lm, load_tokenizer, truncated_copy
from potstill.train import distill

PROMPT_WORDS = 8
STUDENT_LAYERS = 2
ONPOLICY = {"max_new_tokens": 64, "temperature": 1.0}
REGIMES = {
    "offline": {"loss": {"objective": "fkl"}},
    "sequence-level": {"loss": {"objective": "ce"}, "data": {"train": "{gen}"}},
    "on-policy λ=0": {"loss": {"objective": "gjsd(beta=0.5)"}, "data": {"regime": "onpolicy"}, "onpolicy": {"lam": 0.0}},
    "on-policy λ=0.5": {"loss": {"objective": "gjsd(beta=0.5)"}, "data": {"regime": "onpolicy"}, "onpolicy": {"lam": 0.5}},
    "on-policy λ=1": {"loss": {"objective": "gjsd(beta=0.5)"}, "data": {"regime": "onpolicy"}, "onpolicy": {"lam": 1.0}},
    "self-distillation (live)": {"loss": {"objective": "gjsd(beta=0.5)"}, "data": {"regime": "onpolicy", "train": "{privileged}"},
                                 "onpolicy": {"lam": 1.0}, "teacher": {"path": None, "self_distill": "live"}},
    "self-distillation (frozen)": {"loss": {"objective": "gjsd(beta=0.5)"},
                                   "data": {"regime": "onpolicy", "train": "{privileged}"},
                                   "onpolicy": {"lam": 1.0}, "teacher": {"path": None, "self_distill": "frozen"}},
}


def prompt_completion(record: dict, privileged: bool) -> dict:
    """An addition problem as it is (with ``privileged``, its rationale also as the privileged context: any teacher
    reads it, so only the self-distillation file has it); a text cut after PROMPT_WORDS words."""
    if "text" not in record:
        return {**record, "privileged_context": record["completion"].strip()} if privileged else record
    words = record["text"].split()
    return {"prompt": " ".join(words[:PROMPT_WORDS]), "completion": " " + " ".join(words[PROMPT_WORDS:])}


def write_data(out: Path, n: int, privileged: bool) -> Path:
    path = out / "data" / ("privileged.jsonl" if privileged else "train.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for _, record in builtin_records("builtin:mixed", "train", n):
            fh.write(json.dumps(prompt_completion(record, privileged)) + "\n")
    return path


def write_student(teacher: str, out: Path) -> Path:
    """The common starting student: the teacher's embeddings, first STUDENT_LAYERS blocks, norm and head."""
    path = out / "student-init"
    truncated_copy(load_causal_lm(teacher), STUDENT_LAYERS).save_pretrained(path)
    load_tokenizer(teacher).save_pretrained(path)
    return path


def teacher_samples(teacher: str, data: Path, out: Path) -> Path:
    """Sequence-level KD data: one teacher sample (T = 1) per training prompt, unfinished ones kept."""
    path = out / "data" / "teacher.jsonl"
    cfg = RunConfig.from_dict({"teacher": {"path": teacher}, "data": {"train": str(data)},
                               "generate": {"out": str(path), "max_new_tokens": ONPOLICY["max_new_tokens"],
                                            "keep_unfinished": True, "batch_size": 64}}, check_run=False)
    generate(cfg, overwrite=True)
    return path


def merged(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def run_regime(name: str, teacher: str, student: Path, data: dict[str, Path], out: Path, steps: int) -> Path:
    base = {"teacher": {"path": teacher}, "student": {"path": str(student)},
            "data": {"train": str(data["train"]), "validation": "builtin", "max_length": 128, "max_eval_examples": 128},
            "train": {"max_steps": steps, "batch_size": 16, "lr": 1e-3, "eval_every": max(steps // 6, 1), "save_every": 0,
                      "log_every": 10, "seed": 0, "report_to": "none"},
            "onpolicy": ONPOLICY, "eval": {"max_task_examples": 0}, "out_dir": str(out / "runs" / slug(name)), "device": "cpu"}
    raw = merged(base, REGIMES[name])
    raw["data"]["train"] = raw["data"]["train"].format(**{k: str(v) for k, v in data.items()})
    started = time.perf_counter()
    result = distill(RunConfig.from_dict(raw), overwrite=True, progress=False)
    (result.run_dir / "seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return result.run_dir


def slug(name: str) -> str:
    return name.replace(" λ=", "-lam").replace(".", "").replace(" (", "-").replace(")", "")


def curves(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["golden_kl_student"], r.get("kl_teacher_student", float("nan")))
            for r in rows if r["kind"] == "eval" and "golden_kl_student" in r]


def hacking(curve: list[tuple[int, float, float]]) -> str:
    """Where the proxy fell between two evaluations while the golden distance rose."""
    steps = [f"{b[0]}" for a, b in zip(curve, curve[1:]) if b[2] < a[2] and b[1] > a[1]]
    return ", ".join(steps) or "none"


def train_rollout_means(run_dir: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    gen = [r for r in rows if r["kind"] == "train" and "rollout/gen_length" in r]
    if not gen:
        return float("nan"), float("nan")
    return (sum(r["rollout/gen_length"] for r in gen) / len(gen), sum(r["rollout/eos_rate"] for r in gen) / len(gen))


def evaluate_student(model_dir: Path, teacher: str) -> dict:
    text = evaluate_path(model_dir, teacher=teacher, data="builtin")
    arithmetic = evaluate_path(model_dir, data="builtin:arithmetic")
    return {**{k: text[k] for k in ("student_ce", "golden_kl_student", "kl_teacher_student")},
            **{k: arithmetic[k] for k in ("task_accuracy", "gen_length", "eos_rate")}}


def table(results: dict[str, dict]) -> str:
    head = ("| regime | held-out CE | golden KL(true‖student) | proxy KL(teacher‖student) | accuracy | gen length | "
            "EOS rate | rollout length / EOS rate (train) | proxy ↓ while golden ↑ at | seconds |")
    lines = [head, "|---|" + "---:|" * 6 + "---|---|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['student_ce']:.4f} | {r['golden_kl_student']:.4f} | {r['kl_teacher_student']:.4f} | "
                     f"{r['task_accuracy']:.3f} | {r['gen_length']:.1f} | {r['eos_rate']:.3f} | "
                     f"{r['rollout'][0]:.1f} / {r['rollout'][1]:.3f} | {r['hacking']} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="an arithmetic-capable teacher (benchmarks/arithmetic_teacher.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/regimes"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--examples", type=int, default=4000, help="training records (half problems, half texts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="regime names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out / "data", ignore_errors=True)
    data = {"train": write_data(args.out, args.examples, False), "privileged": write_data(args.out, args.examples, True)}
    student = write_student(args.teacher, args.out)
    data["gen"] = teacher_samples(args.teacher, data["train"], args.out)
    results = {"starting student (no training)": {**evaluate_student(student, args.teacher), "rollout": (float("nan"),) * 2,
                                                  "hacking": "-", "seconds": "0"}}
    for name in args.only or REGIMES:
        run_dir = run_regime(name, args.teacher, student, data, args.out, args.steps)
        results[name] = {**evaluate_student(run_dir / "final", args.teacher), "rollout": train_rollout_means(run_dir),
                         "hacking": hacking(curves(run_dir)), "seconds": (run_dir / "seconds.txt").read_text().strip()}
        print(f"{name}: {results[name]}", flush=True)
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(text)


if __name__ == "__main__":
    main()
