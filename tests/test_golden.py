"""Golden-vs-proxy monitor: exact KL(true‖model) on the built-in held-out text, its positions, when it is absent,
the golden early stop, and the report's golden plot and rows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import potstill
from potstill import checkpoint
from potstill.builtin import HiddenMarkovSource, builtin_texts, true_token_logprobs
from potstill.config import RunConfig
from potstill.data.batches import eval_batches
from potstill.data.encode import encode_all
from potstill.data.loading import load_records
from potstill.evaluate import evaluate
from potstill.golden import golden_table
from potstill.monitor import held_out
from potstill.report import compare_runs, write_report


def held_examples(tokenizer, n: int, max_length: int):
    examples, _ = encode_all(tokenizer, load_records("builtin", "validation", n), max_length, "builtin")
    return examples


def naive_golden_kl(model, tokenizer, examples) -> float:
    """From the definition, one example and one position at a time, in float64: Σ_{v: p(v) > 0} p(v)·(log p(v) −
    log q(v)) with p from the source's forward algorithm, averaged over every predicted position."""
    source = HiddenMarkovSource.from_seed(0)
    texts = builtin_texts("validation", max(e.example_id for e in examples) + 1)
    total, count = 0.0, 0
    for e in examples:
        words = texts[e.example_id].split()
        truth = source.next_word_logprobs(words)  # (len(words)+1, W+1) over [*words, EOS]
        columns = tokenizer.convert_tokens_to_ids(source.words) + [tokenizer.eos_token_id]
        with torch.no_grad():
            logq = F.log_softmax(model(torch.tensor([e.input_ids])).logits[0].double(), -1)
        for t in range(len(e.input_ids) - 1):  # position t predicts token t + 1
            for w, logp in enumerate(truth[t]):
                if logp > -math.inf:
                    total += math.exp(logp) * (logp - float(logq[t, columns[w]]))
            count += 1
    return total / count


def test_golden_kl_equals_the_definition(model_dirs, tokenizer):
    student = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2_student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    examples = held_examples(tokenizer, 7, max_length=60)  # some truncated: their golden rows must be cut too
    assert any(len(e.input_ids) == 60 for e in examples) and any(len(e.input_ids) < 60 for e in examples)
    table = golden_table(tokenizer, examples, len(tokenizer))
    batches = eval_batches(examples, 2, tokenizer.pad_token_id)
    m = evaluate(student, batches, teacher=teacher, vocab=len(tokenizer), chunk_size=7, golden=table).metrics
    assert m["golden_kl_student"] == pytest.approx(naive_golden_kl(student, tokenizer, examples), rel=1e-5)
    assert m["golden_kl_teacher"] == pytest.approx(naive_golden_kl(teacher, tokenizer, examples), rel=1e-5)
    no_golden = evaluate(student, batches, teacher=teacher, vocab=len(tokenizer), chunk_size=7).metrics
    assert "golden_kl_student" not in no_golden and no_golden["kl_teacher_student"] == m["kl_teacher_student"]


def test_golden_rows_line_up_with_the_scored_tokens(tokenizer):
    """Row t of true_token_logprobs scores token t + 1 (row 0 = the first word after BOS, the last row = EOS): the
    true log-probs the table gives each scored position, summed over an untruncated document, are exactly the
    source's log-likelihood of the document followed by EOS."""
    source = HiddenMarkovSource.from_seed(0)
    examples = held_examples(tokenizer, 3, max_length=1024)
    texts = builtin_texts("validation", 3)
    rows = true_token_logprobs(tokenizer, source, texts[0], dtype=torch.float64)
    ids = examples[0].input_ids
    assert rows.shape == (len(ids) - 1, len(tokenizer)) and ids[-1] == tokenizer.eos_token_id
    assert rows[-1, tokenizer.eos_token_id] > -math.inf and torch.isinf(rows[0, tokenizer.eos_token_id])
    scored = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert float(scored.sum()) == pytest.approx(source.log_likelihood(texts[0].split()), rel=1e-12)
    # The same through the table's batch lookup (padded batch, examples sorted by length, row-major positions).
    table = golden_table(tokenizer, examples, len(tokenizer))
    for batch in eval_batches(examples, 3, tokenizer.pad_token_id):
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        truth = table.rows(table.positions(batch["example_id"], valid)).double()  # (n_valid, V)
        per_token = truth.gather(1, labels[valid][:, None]).squeeze(1)
        starts = np.cumsum([0] + valid.sum(1).tolist())
        for r, eid in enumerate(batch["example_id"].tolist()):
            expected = source.log_likelihood(texts[eid].split())
            assert float(per_token[starts[r]:starts[r + 1]].sum()) == pytest.approx(expected, rel=1e-6)


def run_config(tmp_path, model_dirs, data: str, *extra) -> RunConfig:
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}",
                                      f"student.path={model_dirs['gpt2_student']}", f"data.train={data}",
                                      f"out_dir={tmp_path / 'run'}", "data.max_length=48", "data.max_eval_examples=6",
                                      "data.max_train_examples=40", "train.batch_size=4", "train.log_every=1",
                                      "eval.max_new_tokens=3", "train.report_to=none", "device=cpu", *extra])


def test_golden_metrics_only_for_builtin_held_out_text(tmp_path, model_dirs, tokenizer, text_jsonl):
    """The same texts from a JSONL file are not the built-in validation split: no golden table, no golden keys."""
    for data, validation, golden in (("builtin", None, True), (str(text_jsonl), None, False),
                                     (str(text_jsonl), "builtin", True), ("builtin", str(text_jsonl), False),
                                     ("builtin:arithmetic", None, False)):
        extra = [f"data.validation={validation}"] if validation else []
        cfg = run_config(tmp_path, model_dirs, data, *extra)
        spec = validation or data
        examples, _ = encode_all(tokenizer, load_records(spec, "validation", 6), 48, spec)
        held = held_out(cfg, tokenizer, examples, len(tokenizer), torch.device("cpu"))
        assert (held.golden is not None) == golden, (data, validation)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2_student"])
    m = evaluate(model, held.batches, vocab=len(tokenizer), golden=held.golden).metrics
    assert not any(k.startswith("golden") for k in m)


def test_golden_early_stop_ends_the_run_and_leaves_a_valid_run(tmp_path, model_dirs):
    """lr 0: the golden KL never improves after the first evaluation, so patience 2 stops at the third (step 6)
    with a checkpoint, final/ (the model at the stopping step), an early_stop row and the report; resuming the
    stopped run trains nothing more."""
    cfg = run_config(tmp_path, model_dirs, "builtin", "train.lr=0", "train.max_steps=20", "train.eval_every=2",
                     "train.save_every=0", "eval.early_stop=golden", "eval.patience=2")
    result = potstill.distill(cfg, progress=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert evals[0]["golden_kl_student"] == evals[2]["golden_kl_student"]
    stop = [r for r in rows if r["kind"] == "early_stop"]
    assert stop == [{"step": 6, "kind": "early_stop", "metric": "golden_kl_student",
                     "best": evals[0]["golden_kl_student"], "best_step": 2, "patience": 2}]
    assert max(r["step"] for r in rows if r["kind"] == "train") == 6
    assert checkpoint.latest_checkpoint(result.run_dir) == checkpoint.checkpoint_dir(result.run_dir, 6)
    assert (result.final_dir / "model.safetensors").exists() and (result.run_dir / "plots" / "golden.png").exists()
    resumed = potstill.distill(cfg, resume=True, progress=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["kind"] == "train") == 6
    assert resumed.metrics["golden_kl_student"] == pytest.approx(evals[2]["golden_kl_student"], rel=1e-6)


def test_golden_early_stop_needs_builtin_held_out_text(tmp_path, model_dirs, text_jsonl):
    with pytest.raises(ValueError, match="eval.early_stop=golden needs golden metrics"):
        run_config(tmp_path, model_dirs, str(text_jsonl), "eval.early_stop=golden")
    with pytest.raises(ValueError, match="eval.early_stop='best': use none or golden"):
        run_config(tmp_path, model_dirs, "builtin", "eval.early_stop=best")
    with pytest.raises(ValueError, match="eval.patience must be ≥ 1"):
        run_config(tmp_path, model_dirs, "builtin", "eval.patience=0")


def test_report_plots_golden_vs_proxy_and_lists_the_numbers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "kind": "eval", "student_ce": 4.0 - s / 10, "kl_teacher_student": 1.0 - s / 20,
             "golden_kl_student": 1.2 - s / 25, "golden_kl_teacher": 0.0125, "teacher_ce": 3.2} for s in (5, 10)]
    rows.append({"step": 10, "kind": "early_stop", "metric": "golden_kl_student", "best": 0.8, "best_step": 10,
                 "patience": 1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(run).read_text()
    assert "![golden vs proxy](plots/golden.png)" in report and (run / "plots" / "golden.png").stat().st_size > 0
    assert "| golden KL(true ‖ model) | 0.8000 | 0.0125 |" in report
    table = compare_runs([run])
    assert "golden_kl_student" in table.splitlines()[0] and "0.8000" in table


def test_shipped_configs_set_every_monitor_key():
    """Every eval.* key this monitor adds, and the arithmetic sources, are set in a shipped config that loads."""
    from tests.test_data_config import CONFIG_DIR

    golden = RunConfig.from_yaml(CONFIG_DIR / "golden-early-stop.yaml")
    assert (golden.eval.early_stop, golden.eval.patience, golden.data.train) == ("golden", 3, "builtin")
    tasks = RunConfig.from_yaml(CONFIG_DIR / "arithmetic-multitask.yaml")
    assert (tasks.data.train, tasks.eval.max_task_examples, tasks.eval.task_max_new_tokens) == \
        ("builtin:arithmetic-multitask", 64, 0)
