"""LoRA vs full fine-tune on the built-in default (configs/quickstart.yaml) at equal steps.

    python benchmarks/lora.py INIT R STEPS    # INIT: fresh (the quickstart student) or teacher2 (teacher's first 2 layers)

Prints one JSON line: trainable/total parameters, held-out CE, KL, median step time, bytes in final/.
"""
import json, sys, time
from pathlib import Path
import torch
from potstill.config import RunConfig
from potstill.train import distill
import potstill.train as T

torch.set_num_threads(2)
init, lora_r, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = Path(f"/tmp/measure/{init}-r{lora_r}")
over = [f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0", "train.report_to=none", f"out_dir={out}",
        f"student.lora.r={lora_r}", f"student.lora.alpha={2 * lora_r}" if lora_r else "student.lora.alpha=null"]
if init == "teacher2":
    over += ["student.config=", "student.init_from_teacher_layers=2"]
cfg = RunConfig.from_yaml("potstill/configs/quickstart.yaml", over)
seen = {}
orig = T.make_optimizer
def counting(cfg, model):
    seen["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seen["total"] = sum(p.numel() for p in model.parameters())
    return orig(cfg, model)
T.make_optimizer = counting
result = distill(cfg, progress=False, overwrite=True)
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r["kind"] == "train"]
step_s = [r["tokens"] / r["tokens_per_s"] for r in train[1:]]
size = sum(f.stat().st_size for f in (out / "final").rglob("*") if f.is_file())
print(json.dumps({"init": init, "r": lora_r, "steps": steps, **seen, "held_out_ce": result.metrics["student_ce"],
                  "kl": result.metrics.get("kl_teacher_student"), "median_step_s": sorted(step_s)[len(step_s) // 2],
                  "final_bytes": size}))
