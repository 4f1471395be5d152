"""potstill's side of `benchmarks/onpolicy.py`: one child process, run with potstill's environment.

    python benchmarks/onpolicy_potstill.py SETTINGS.json

`potstill.distill` with `data.regime=onpolicy onpolicy.lam=1` on the settings the parent wrote (the same saved
teacher/student/tokenizer, chat prompts, batch size, max new tokens, temperature, `gjsd(beta=...)`, constant
learning rate, fp32, threads, seed). potstill has no config key for a minimum length, so this script holds EOS off
as TRL's side does (`min_new_tokens = max_new_tokens`) by passing it on the sampling settings of every rollout
(`potstill.sampling.SamplingSettings.min_new_tokens`). The loop's own steps, timed from outside by wrapping
`Loop.one_step`; the held-out evaluation at the last step and the final save come after the last timed step end.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy_clock import StepClock, emit  # noqa: E402

import potstill  # noqa: E402
from potstill import models, train  # noqa: E402
from potstill.config import RunConfig  # noqa: E402

try:
    from potstill.onpolicy import rollouts
except ImportError:
    sys.exit("error: this potstill has no on-policy regime (potstill.onpolicy); merge it first")


def overrides(s: dict) -> list[str]:
    return [f"teacher.path={s['teacher_dir']}", f"student.path={s['student_dir']}", f"data.train={s['data']}",
            "data.max_length=256", "data.max_eval_examples=8", "data.regime=onpolicy", "onpolicy.lam=1",
            f"onpolicy.max_new_tokens={s['max_new_tokens']}", f"onpolicy.temperature={s['temperature']}",
            f"loss.objective=gjsd(beta={s['beta']})", f"train.batch_size={s['batch_size']}",
            f"train.max_steps={s['steps']}", f"train.lr={s['lr']}", "train.schedule=constant", "train.warmup_steps=0",
            "train.max_grad_norm=1.0", f"train.seed={s['seed']}", "train.eval_every=0", "train.save_every=0",
            "train.log_every=1", "train.report_to=none", "train.precision=fp32", "teacher.dtype=float32",
            "eval.max_new_tokens=4", "device=cpu", f"out_dir={s['out_dir']}"]


def time_the_loop(clock: StepClock, min_new_tokens: int) -> None:
    """Step ends after every `Loop.one_step`; rollouts timed (and held to a fixed length) around `sample`."""
    one_step, sample = train.Loop.one_step, rollouts.sample

    def timed_step(self):
        stats = one_step(self)
        clock.step_ended()
        return stats

    def timed_sample(model, prompts, settings, **kwargs):
        started = time.perf_counter()
        out = sample(model, prompts, dataclasses.replace(settings, min_new_tokens=min_new_tokens), **kwargs)
        clock.add_rollout(time.perf_counter() - started, sum(len(t) for t in out.tokens),
                          max(len(p) for p in prompts))
        return out

    train.Loop.one_step, rollouts.sample = timed_step, timed_sample


def main() -> None:
    s = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(s["threads"])
    clock = StepClock(warmup=s["warmup"])
    time_the_loop(clock, s["max_new_tokens"])
    load = models.load_causal_lm

    def load_and_watch(path, dtype, field, *args, **kwargs):  # time the teacher's decoder body (hooks)
        model = load(path, dtype, field, *args, **kwargs)
        if field == "teacher.path":
            clock.watch_teacher(model.model)
        return model

    models.load_causal_lm = load_and_watch
    potstill.distill(RunConfig.from_yaml(None, overrides(s)), progress=False)
    emit(clock.summary(side="potstill", version=f"potstill {getattr(potstill, '__version__', '?')}",
                       threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
