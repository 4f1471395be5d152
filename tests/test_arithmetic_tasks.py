"""Built-in arithmetic sources (plain, multitask, mixed) and answer accuracy measured by the checker on greedy
generations during evaluation."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import potstill
from potstill.builtin.arithmetic import extract_answer
from potstill.builtin.sources import LABEL_PREFIX, RATIONALE_PREFIX
from potstill.builtin.teacher import builtin_teacher_dir
from potstill.builtin.tokenizer import builtin_vocabulary
from potstill.config import RunConfig
from potstill.data.encode import encode_all
from potstill.data.loading import load_records
from potstill.labels import IGNORE_INDEX
from potstill.task_eval import task_metrics, task_prompts

SPECS = ("builtin:arithmetic", "builtin:arithmetic-multitask", "builtin:mixed")
PROMPT = re.compile(r"(?:(answer|write) )?what is ([0-9 ]+) \+ ([0-9 ]+) \?")


def operands_sum(prompt: str) -> int:
    """a + b read off the prompt's spaced digits (independent of the generator)."""
    _, a, b = PROMPT.fullmatch(prompt).groups()
    return int(a.replace(" ", "")) + int(b.replace(" ", ""))


@pytest.mark.parametrize("spec", SPECS)
def test_arithmetic_records_are_deterministic_and_checkable(spec):
    for split in ("train", "validation"):
        records = load_records(spec, split, 1000)
        assert records == load_records(spec, split, 1000) and [i for i, _ in records] == list(range(1000))
        assert load_records(spec, split, 10) == records[:10]  # a smaller limit is a prefix
        problems = [r for _, r in records if "answer" in r]
        assert len(problems) >= 500
        for r in problems:
            assert extract_answer(r["completion"]) == r["answer"] == str(operands_sum(r["prompt"]))
    assert load_records(spec, "train", 4) != load_records(spec, "validation", 4)  # independent streams


def test_multitask_records_pair_label_and_rationale_with_one_token_prefixes(tokenizer):
    records = [r for _, r in load_records("builtin:arithmetic-multitask", "validation", 6)]
    plain = [r for _, r in load_records("builtin:arithmetic", "validation", 3)]
    for i, problem in enumerate(plain):
        label, rationale = records[2 * i], records[2 * i + 1]
        assert label == {"prompt": f"{LABEL_PREFIX} {problem['prompt']}", "task": "label", "answer": problem["answer"],
                         "completion": " answer " + " ".join(problem["answer"])}
        assert rationale == {"prompt": f"{RATIONALE_PREFIX} {problem['prompt']}", "task": "rationale",
                             "answer": problem["answer"], "completion": problem["completion"]}
    # the prefixes are existing single tokens: the vocabulary is the shipped teacher's
    assert all(tokenizer.convert_tokens_to_ids(p) != tokenizer.unk_token_id for p in (LABEL_PREFIX, RATIONALE_PREFIX))
    shipped = json.loads((builtin_teacher_dir() / "config.json").read_text())["vocab_size"]
    assert len(builtin_vocabulary()) == len(tokenizer) == shipped
    examples, _ = encode_all(tokenizer, load_records("builtin:arithmetic-multitask", "validation", 2), 128, "mt")
    for example, record in zip(examples, records):
        prompt_ids = tokenizer(record["prompt"])["input_ids"]  # BOS + prefix + problem
        completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert prompt_ids[1] == tokenizer.convert_tokens_to_ids(LABEL_PREFIX if record["task"] == "label" else RATIONALE_PREFIX)
        assert example.input_ids == prompt_ids + completion_ids
        assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        assert example.fields == {"prompt": record["prompt"], "answer": record["answer"], "task": record["task"]}


def test_mixed_interleaves_problems_and_grammar_texts():
    records = [r for _, r in load_records("builtin:mixed", "train", 6)]
    assert [("answer" in r, "text" in r) for r in records] == [(True, False), (False, True)] * 3
    assert records[0::2] == [r for _, r in load_records("builtin:arithmetic", "train", 3)]
    assert [r["text"] for r in records[1::2]] == [r["text"] for _, r in load_records("builtin", "train", 3)]


def test_unknown_builtin_source_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown built-in data source 'builtin:arithmetc'. Did you mean \"builtin:arithmetic\""):
        load_records("builtin:arithmetc")


def overfit_model(tokenizer, examples, steps: int = 200) -> LlamaForCausalLM:
    """A tiny Llama trained (plain CE on the completions) until it reproduces these examples' completions."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id))
    width = max(len(e.input_ids) for e in examples)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples])
    mask = (torch.arange(width)[None] < torch.tensor([len(e.input_ids) for e in examples])[:, None]).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval()


def hand_scores(model, tokenizer, prompts, max_new_tokens):
    """One prompt at a time with transformers' own greedy generate; the answer read with a regex, not the checker."""
    hits, lengths, eos = [], [], []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p.prompt_ids]), attention_mask=torch.ones(1, len(p.prompt_ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(p.prompt_ids):].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        text = tokenizer.decode(new, skip_special_tokens=True)
        found = re.findall(r"answer((?: [0-9])+)", text)
        hits.append(bool(found) and found[-1].replace(" ", "") == p.answer)
        lengths.append(len(new))
        eos.append(new[-1] == tokenizer.eos_token_id)
    n = len(prompts)
    return sum(hits) / n, sum(lengths) / n, sum(eos) / n, hits


def test_task_accuracy_equals_a_hand_computation_on_real_generations(tokenizer):
    """4 problems the model learnt (correct) and 4 it never saw: batched, left-padded greedy generations scored by
    the checker agree with transformers' unbatched generate scored by a regex."""
    trained, _ = encode_all(tokenizer, load_records("builtin:arithmetic", "train", 4), 128, "train")
    unseen, _ = encode_all(tokenizer, load_records("builtin:arithmetic", "validation", 4), 128, "validation")
    model = overfit_model(tokenizer, trained)
    unseen = [dataclasses.replace(e, example_id=e.example_id + 100) for e in unseen]  # distinct ids
    prompts = task_prompts(trained + unseen, per_task=8)
    assert len(prompts) == 8
    metrics = task_metrics(model, tokenizer, prompts, max_new_tokens=50, batch_size=3)
    accuracy, gen_length, eos_rate, hits = hand_scores(model, tokenizer, prompts, 50)
    assert hits[:4] == [True] * 4  # the learnt problems are answered right
    assert metrics == pytest.approx({"task_accuracy": accuracy, "gen_length": gen_length, "eos_rate": eos_rate}, rel=1e-12)
    assert task_prompts(trained + unseen, per_task=3) == prompts[:3]


def test_multitask_run_logs_accuracy_per_task(tmp_path, model_dirs):
    cfg = RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}",
                                     f"student.path={model_dirs['gpt2_student']}", "data.train=builtin:arithmetic-multitask",
                                     f"out_dir={tmp_path / 'run'}", "data.max_length=64", "data.max_eval_examples=10",
                                     "data.max_train_examples=40", "train.batch_size=4", "train.max_steps=2",
                                     "eval.max_task_examples=3", "eval.max_new_tokens=3", "train.report_to=none",
                                     "device=cpu"])
    result = potstill.distill(cfg, progress=False)
    row = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    keys = {"task_accuracy", "gen_length", "eos_rate", "task_accuracy/rationale", "gen_length/rationale", "eos_rate/rationale"}
    assert keys <= set(row) and not any(k.startswith("golden") for k in row)
    # auto max_new_tokens per task: its longest completion (label: "answer" + ≤ 4 digits + EOS; rationale ≤ 48) + 8
    assert 1 <= row["gen_length"] <= 6 + 8 and 1 <= row["gen_length/rationale"] <= 48 + 8
    assert "| answer accuracy (greedy) |" in (result.run_dir / "report.md").read_text()
