"""Answer accuracy on checkable held-out tasks (the built-in arithmetic): greedy generations from the held-out
prompts, scored by the task's checker (``builtin.arithmetic.accuracy``), with the generations' length and EOS rate.

Prompts are the held-out examples' own prompt tokens (their masked prefix: exactly what the model reads before the
completion in training), so generation starts where the trained completion starts. Generation goes through the one
rollout routine (``sampling.sample``, temperature 0) in batches of ``eval.batch_size``.

Multitask data (``builtin:arithmetic-multitask``) carries a ``task`` per record: every task is measured on its
own prompts; the label task's numbers are the plain ``task_accuracy`` / ``gen_length`` / ``eos_rate`` and any other
task's carry a ``/<task>`` suffix (``task_accuracy/rationale``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from potstill.builtin.arithmetic import accuracy
from potstill.data.encode import Example
from potstill.evaluate import _eval_mode
from potstill.labels import IGNORE_INDEX
from potstill.sampling import SamplingSettings, sample

PRIMARY_TASK = "label"  # a multitask run's headline accuracy: the label task (answer without rationale)
AUTO_MARGIN = 8  # auto max_new_tokens: a task's longest held-out completion (with EOS) plus this many tokens


@dataclass(frozen=True)
class TaskPrompt:
    example_id: int
    prompt_ids: list[int]  # BOS + prompt tokens, as in training
    answer: str
    task: str  # "" for single-task data
    completion_tokens: int  # the reference completion's length (with EOS)


def _prompt_length(example: Example) -> int:
    """Leading tokens without a label: the prompt the completion follows."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def task_prompts(examples: list[Example], per_task: int) -> list[TaskPrompt]:
    """Up to ``per_task`` prompts per task from the held-out examples that carry an answer, in example-id order."""
    chosen: list[TaskPrompt] = []
    counts: dict[str, int] = {}
    for e in sorted(examples, key=lambda e: e.example_id):
        if "answer" not in e.fields:
            continue
        task = e.fields.get("task", "")
        if counts.get(task, 0) >= per_task:
            continue
        counts[task] = counts.get(task, 0) + 1
        n = _prompt_length(e)
        chosen.append(TaskPrompt(e.example_id, e.input_ids[:n], e.fields["answer"], task, len(e.input_ids) - n))
    return chosen


def auto_max_new_tokens(prompts: list[TaskPrompt], configured: int) -> int:
    """``configured``, or when 0 the longest reference completion of these prompts (EOS included) + AUTO_MARGIN."""
    return configured if configured > 0 else max(p.completion_tokens for p in prompts) + AUTO_MARGIN


def _suffix(task: str, tasks: set[str]) -> str:
    primary = PRIMARY_TASK if PRIMARY_TASK in tasks else ""
    return "" if task == primary or len(tasks) == 1 else f"/{task}"


def _greedy(model: nn.Module, tokenizer, prompts: list[TaskPrompt], max_new_tokens: int,
            batch_size: int) -> tuple[list[str], list[int], list[bool]]:
    """(decoded completions, new-token counts with EOS, finished by EOS) of greedy generations, in batches."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    texts, lengths, finished = [], [], []
    for start in range(0, len(prompts), batch_size):
        out = sample(model, [p.prompt_ids for p in prompts[start : start + batch_size]], settings,
                     eos_ids=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
        texts += [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out.tokens]
        lengths += [len(tokens) for tokens in out.tokens]
        finished += out.finished
    return texts, lengths, finished


def task_metrics(model: nn.Module, tokenizer, prompts: list[TaskPrompt], max_new_tokens: int, batch_size: int) -> dict:
    """task_accuracy, gen_length (mean new tokens, EOS included) and eos_rate per task (see the module docstring).
    ``max_new_tokens`` 0 = per task, its longest reference completion + AUTO_MARGIN."""
    tasks = {p.task for p in prompts}
    metrics: dict[str, float] = {}
    with _eval_mode(model):
        for task in sorted(tasks):
            group = [p for p in prompts if p.task == task]
            texts, lengths, finished = _greedy(model, tokenizer, group, auto_max_new_tokens(group, max_new_tokens), batch_size)
            suffix = _suffix(task, tasks)
            metrics[f"task_accuracy{suffix}"] = accuracy(texts, [p.answer for p in group])
            metrics[f"gen_length{suffix}"] = sum(lengths) / len(group)
            metrics[f"eos_rate{suffix}"] = sum(finished) / len(group)
    return metrics
