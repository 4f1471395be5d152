"""Two teachers vs the better one alone, at equal budget, on `builtin:mixed` (grammar texts and 2-3 digit additions
interleaved one to one). One torch thread.

    python benchmarks/multi_teacher.py --teacher-b DIR --out DIR [--steps 400] [--seeds 0]

Teacher A is the shipped built-in teacher (grammar texts only: it has never seen an addition). Teacher B is a
specialist: the same architecture trained from scratch with label CE on `builtin:arithmetic` only
(``build_teacher_b``: 1200 steps, batch 32; it is built into --teacher-b when that directory is missing). The student
is a fresh 2-layer Llama (hidden 64) trained for the same steps, batch, data order and learning rate in every
variant: CE only, fkl from A alone, from B alone, and from A + B mixed per position (teachers.mix fixed 1:1,
confidence, correctness, ddk, and route: text records → A, arithmetic records → B through their `teacher_id`).
Training data is the first steps × batch records of `builtin:mixed` written to JSONL (with the `teacher_id` route
uses); held-out data is the `builtin:mixed` validation split (250 texts, 250 additions).

Per domain it reports the student's held-out CE per labelled token, KL(A‖student) on text and KL(B‖student) on
arithmetic (each domain's competent teacher), and greedy answer accuracy on the 250 held-out additions; the
teachers' own rows come first. Everything goes to OUT/results.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from potstill import models
from potstill.builtin.sources import builtin_records
from potstill.builtin.teacher import builtin_teacher_dir
from potstill.config import RunConfig
from potstill.data.batches import eval_batches
from potstill.data.encode import encode_all
from potstill.data.loading import load_records
from potstill.labels import IGNORE_INDEX
from potstill.multiteacher.domains import domains_by_id
from potstill.task_eval import task_metrics, task_prompts
from potstill.train import distill

STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}
TEACHER_B_TRAIN = {"max_steps": 1200, "batch_size": 32, "lr": 3e-3, "warmup_steps": 60, "seed": 1234, "log_every": 50,
                   "eval_every": 0, "save_every": 0, "keep_checkpoints": 0, "report_to": "none"}
BATCH = 16
EVAL_EVERY = 50  # every variant evaluates alike (evaluation never changes training); ddk re-weighs at each one
HELD_OUT = 500  # the whole builtin:mixed validation split
DOMAIN_NAMES = {"text": "text", "prompt/completion": "arithmetic"}  # record kinds of builtin:mixed
VARIANTS = {  # name -> (first teacher, teachers.* section or None, objective)
    "CE only": (None, None, "ce"),
    "A alone": ("A", None, "fkl"),
    "B alone": ("B", None, "fkl"),
    "A+B fixed 1:1": ("A", {"mix": "fixed"}, "fkl"),
    "A+B confidence": ("A", {"mix": "confidence"}, "fkl"),
    "A+B correctness": ("A", {"mix": "correctness"}, "fkl"),
    "A+B ddk": ("A", {"mix": "ddk"}, "fkl"),
    "A+B route": ("A", {"mix": "route"}, "fkl"),
}


def build_teacher_b(out: Path) -> Path:
    """Teacher B: the built-in teacher's architecture, fresh (seeded), label CE on builtin:arithmetic only."""
    from potstill.builtin.build_teacher import initial_model_dir

    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".b-build-"))
    try:
        initial_model_dir(work / "init")
        cfg = RunConfig.from_dict({"student": {"path": str(work / "init")}, "loss": {"objective": "ce"},
                                   "data": {"train": "builtin:arithmetic", "max_length": 128, "max_eval_examples": 128},
                                   "train": TEACHER_B_TRAIN, "out_dir": str(work / "run"), "device": "cpu"})
        final = distill(cfg, progress=False).final_dir
        shutil.rmtree(final / "potstill", ignore_errors=True)
        shutil.move(str(final), out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def write_training_jsonl(path: Path, n: int) -> None:
    """The first n builtin:mixed training records, each with the teacher_id route uses (text → A, arithmetic → B)."""
    with path.open("w") as fh:
        for _, record in builtin_records("builtin:mixed", "train", n):
            fh.write(json.dumps({**record, "teacher_id": "B" if "answer" in record else "A"}) + "\n")


def run_config(name: str, data: Path, out: Path, teacher_b: Path, steps: int, seed: int) -> RunConfig:
    first, teachers, objective = VARIANTS[name]
    paths = {"A": "builtin", "B": str(teacher_b)}
    raw = {"student": {"config": STUDENT}, "loss": {"objective": objective},
           "data": {"train": str(data), "validation": "builtin:mixed", "max_length": 128, "max_eval_examples": HELD_OUT},
           "train": {"max_steps": steps, "batch_size": BATCH, "lr": 3e-3, "warmup_steps": steps // 10, "seed": seed,
                     "log_every": 50, "eval_every": EVAL_EVERY, "save_every": 0, "keep_checkpoints": 0,
                     "report_to": "none"},
           "eval": {"max_task_examples": 0}, "out_dir": str(out), "device": "cpu"}
    if first is not None:
        raw["teacher"] = {"path": paths[first]}
    if teachers is not None:
        raw["teachers"] = {"name": "A", "extra": [{"name": "B", "path": paths["B"]}], **teachers}
    if name == "CE only":  # the teacher is loaded for its tokenizer only (and the held-out KL), never in the loss
        raw["teacher"] = {"path": "builtin"}
    return RunConfig.from_dict(raw)


@torch.no_grad()
def domain_metrics(model, teachers: dict, batches: list[dict], domain_of: dict[int, str], vocab: int) -> dict:
    """Per domain: mean CE per labelled token, and mean KL(teacher‖model) per labelled token for each teacher."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    model.eval()
    for batch in batches:
        logq = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab].float(), -1)
        logps = {name: F.log_softmax(t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :vocab].float(), -1)
                 for name, t in teachers.items()}
        labels = batch["labels"][:, 1:]
        for row, example_id in enumerate(batch["example_id"].tolist()):
            keep = labels[row] != IGNORE_INDEX
            d = domain_of[example_id]
            counts[d] = counts.get(d, 0) + int(keep.sum())
            ce = -logq[row][keep].gather(-1, labels[row][keep][:, None]).sum().item()
            sums[f"{d}/ce"] = sums.get(f"{d}/ce", 0.0) + ce
            for name, logp in logps.items():
                kl = (logp[row][keep].exp() * (logp[row][keep] - logq[row][keep])).sum().item()
                sums[f"{d}/kl_{name}"] = sums.get(f"{d}/kl_{name}", 0.0) + kl
    return {key: value / counts[key.split("/")[0]] for key, value in sums.items()}


def evaluate_model(model, teachers, held, domain_of, tokenizer, vocab) -> dict:
    batches = eval_batches(held, 32, tokenizer.pad_token_id)
    row = domain_metrics(model, teachers, batches, domain_of, vocab)
    row["all/ce"] = sum(row[f"{d}/ce"] * n for d, n in token_counts(held, domain_of).items()) / sum(token_counts(held, domain_of).values())
    row["task_accuracy"] = task_metrics(model, tokenizer, task_prompts(held, HELD_OUT), 0, 64)["task_accuracy"]
    return row


def token_counts(held, domain_of) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in held:
        counts[domain_of[e.example_id]] = counts.get(domain_of[e.example_id], 0) + sum(l != IGNORE_INDEX for l in e.labels[1:])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-b", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.teacher_b.exists():
        build_teacher_b(args.teacher_b)
    data = args.out / "mixed-train.jsonl"
    write_training_jsonl(data, args.steps * BATCH)
    tokenizer = models.load_tokenizer(str(builtin_teacher_dir()))
    held, _ = encode_all(tokenizer, load_records("builtin:mixed", "validation")[:HELD_OUT], 128, "builtin:mixed")
    domain_of = {i: DOMAIN_NAMES[d] for i, d in domains_by_id(load_records("builtin:mixed", "validation"), "builtin:mixed").items()}
    vocab = len(tokenizer)
    teachers = {"A": models.load_causal_lm(str(builtin_teacher_dir())).eval(), "B": models.load_causal_lm(str(args.teacher_b)).eval()}
    results = {"teachers": {name: evaluate_model(t, teachers, held, domain_of, tokenizer, vocab) for name, t in teachers.items()}}
    for seed in args.seeds:
        for name in args.variants:
            started = time.perf_counter()
            result = distill(run_config(name, data, args.out / f"{name.replace(' ', '_').replace(':', '-')}-s{seed}",
                                        args.teacher_b, args.steps, seed), overwrite=True, progress=False)
            seconds = time.perf_counter() - started
            student = models.load_causal_lm(str(result.final_dir)).eval()
            results[f"{name} (seed {seed})"] = {**evaluate_model(student, teachers, held, domain_of, tokenizer, vocab),
                                                "train_seconds": round(seconds, 1)}
            print(name, seed, json.dumps(results[f"{name} (seed {seed})"]), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = ["| model | CE text | CE arithmetic | CE all | KL(A‖s) text | KL(B‖s) arithmetic | answer accuracy | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(f"teacher {n}", r) for n, r in results["teachers"].items()] + [(n, r) for n, r in results.items() if n != "teachers"]
    for name, r in rows:
        lines.append(f"| {name} | {r['text/ce']:.4f} | {r['arithmetic/ce']:.4f} "
                     f"| {r['all/ce']:.4f} | {r['text/kl_A']:.4f} | {r['arithmetic/kl_B']:.4f} "
                     f"| {100 * r['task_accuracy']:.1f} % | {r.get('train_seconds', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
