"""Speculative-decoding drafts at equal training budget (issue #15): CE-only vs DistillSpec vs AdaSPEC.

    python benchmarks/speculative_drafts.py --target runs/spec/target/model --out runs/spec/drafts [--steps 300]

Every draft starts from the same point, the target's embeddings, first block, final norm and head
(`student.init_from_teacher_layers: 1`), and trains with potstill's one loop for the same steps, batch and learning
rate on the built-in language (`data.train: builtin`); only the objective, where the trained tokens come from and
which tokens count differ:

| draft | recipe |
|---|---|
| start | no training: the starting point itself (what each recipe's training adds) |
| ce | label CE on the data (no teacher signal): the undistilled baseline |
| kd | forward KL to the target, teacher-forced on the data (plain KD; AdaSPEC's reference) |
| distillspec | on-policy (`data.regime: onpolicy`, λ = 1: the draft's own T = 1 samples after 8-token prompts), TVD (= 1 − α) |
| distillspec-fkl | (only with --only) on-policy as distillspec, forward KL |
| adaspec | forward KL on the 40 % of tokens where KL(p‖q_draft) − KL(p‖q_ref) is largest (`loss.select: reference(keep=0.4)`, `loss.reference`: the kd draft) |

AdaSPEC's total cost is its own run plus the kd run that made its reference (both reported). Each final draft
is evaluated against the target on the built-in validation text (held-out CE, KL(target‖draft), top-1 agreement,
acceptance_alpha = 1 − TVD at T = 1); acceptance in decoding is
measured by `benchmarks/speculative.py`. Writes OUT/<draft>/ (the potstill run; the draft is OUT/<draft>/final)
and OUT/drafts.json (seconds and metrics per draft).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from potstill.config import RunConfig
from potstill.evaluate_run import evaluate_path
from potstill.models import load_causal_lm, load_tokenizer, truncated_copy
from potstill.train import distill

DRAFT_LAYERS = 1
DATA = {"train": "builtin", "validation": "builtin", "max_length": 128, "max_eval_examples": 128}
RECIPES = {
    "ce": {"loss": {"objective": "ce"}},
    "kd": {"loss": {"objective": "fkl"}},
    "distillspec": {"loss": {"objective": "tvd"}, "data": {"regime": "onpolicy"},
                    "onpolicy": {"lam": 1.0, "temperature": 1.0, "max_new_tokens": 64, "prompt_tokens": 8}},
    "adaspec": {"loss": {"objective": "fkl", "select": "reference(keep=0.4)", "reference": "{kd}"}},
    # DistillSpec's other divergence, on the same on-policy data (not in the default set: --only distillspec-fkl)
    "distillspec-fkl": {"loss": {"objective": "fkl"}, "data": {"regime": "onpolicy"},
                        "onpolicy": {"lam": 1.0, "temperature": 1.0, "max_new_tokens": 64, "prompt_tokens": 8}},
}
DEFAULT = ("start", "ce", "kd", "distillspec", "adaspec")
# --fresh: a draft built from this config instead (random init, 1 layer, hidden 64: ~0.13 M parameters without the
# shared-vocabulary head), so the CE-only baseline cannot lean on the target's own first block
FRESH_DRAFT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 1,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
               "tie_word_embeddings": True}


def recipe_config(name: str, target: str, out: Path, steps: int, batch: int, lr: float, fresh: bool) -> RunConfig:
    extra = RECIPES[name]
    student = {"config": FRESH_DRAFT} if fresh else {"init_from_teacher_layers": DRAFT_LAYERS}
    raw = {"teacher": {"path": target}, "student": student,
           "data": dict(DATA), "loss": {},
           "train": {"max_steps": steps, "batch_size": batch, "lr": lr, "warmup_steps": steps // 10,
                     "schedule": "cosine", "eval_every": max(steps // 3, 1), "save_every": 0, "log_every": 25, "seed": 0,
                     "report_to": "none"},
           "eval": {"max_task_examples": 0}, "out_dir": str(out / name), "device": "cpu"}
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    if raw["loss"].get("reference") == "{kd}":
        raw["loss"]["reference"] = str(out / "kd" / "final")
    return RunConfig.from_dict(raw)


def starting_draft(target: str, out: Path) -> dict:
    """The common starting point, untrained (`start`): what every recipe's training adds is measured against it."""
    path = out / "start" / "final"
    truncated_copy(load_causal_lm(target), DRAFT_LAYERS).save_pretrained(path)
    load_tokenizer(target).save_pretrained(path)
    return {"seconds": 0.0, "draft": str(path), **evaluated(path, target)}


def evaluated(path: Path, target: str) -> dict:
    row = evaluate_path(path, teacher=target, data="builtin")
    return {k: row[k] for k in ("student_ce", "kl_teacher_student", "teacher_ce", "top1_agreement", "acceptance_alpha")
            if k in row}


def train_draft(name: str, target: str, out: Path, steps: int, batch: int, lr: float, fresh: bool) -> dict:
    started = time.perf_counter()
    result = distill(recipe_config(name, target, out, steps, batch, lr, fresh), overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "draft": str(result.final_dir), **evaluated(result.final_dir, target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="the target model dir (benchmarks/draft_target.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/spec/drafts"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None,
                        help="drafts to train (default: all; adaspec needs kd); `start` = the untrained starting draft")
    parser.add_argument("--fresh", action="store_true", help="drafts from FRESH_DRAFT (random init) instead of the "
                        "target's first layer; `start` is then not available")
    args = parser.parse_args()
    if args.fresh and "start" in (args.only or DEFAULT):
        parser.error("--fresh: name the drafts with --only (ce kd distillspec adaspec); `start` is the truncated target")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "drafts.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["settings"] = {"target": args.target, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                           "threads": args.threads, "draft": FRESH_DRAFT if args.fresh else f"target's first {DRAFT_LAYERS}",
                           "recipes": RECIPES}
    for name in args.only or DEFAULT:
        summary[name] = (starting_draft(args.target, args.out) if name == "start"
                         else train_draft(name, args.target, args.out, args.steps, args.batch, args.lr, args.fresh))
        print(f"{name}: {summary[name]}", flush=True)
        summary_path.write_text(json.dumps(summary, indent=2))
    if "adaspec" in summary and "kd" in summary:
        summary["adaspec"]["seconds_with_reference"] = round(summary["adaspec"]["seconds"] + summary["kd"]["seconds"], 1)
        summary_path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
