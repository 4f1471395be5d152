"""Self-distillation with privileged context (teacher.self_distill, records' `privileged_context`): the teacher reads
[BOS] + privileged + prompt + completion and scores the student's tokens at the matching positions; frozen, EMA and
live teachers (docs/onpolicy.md)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import potstill
from potstill.config import RunConfig
from potstill.data.batches import collate
from potstill.data.encode import Example
from potstill.labels import IGNORE_INDEX
from potstill.models import HiddenAndHead
from potstill.onpolicy import regime as regimes
from potstill.onpolicy.self_distill import LiveTeacher, ema_update, privileged_signal, with_teacher_view

from conftest import after_load, builtin_prompt_completion_jsonl, simulate_crash

BOS = 1


@pytest.fixture(scope="module")
def privileged_jsonl(tmp_path_factory):
    """prompt/completion records whose privileged context is the reference completion itself."""
    return builtin_prompt_completion_jsonl(tmp_path_factory.mktemp("priv") / "train.jsonl", 30, 3, 6, privileged=True)


def config(tmp_path, model_dirs, data, *extra, out="run"):
    return RunConfig.from_yaml(None, [f"student.path={model_dirs['gpt2_student']}", f"data.train={data}",
                                      f"out_dir={tmp_path / out}", "data.max_length=24", "data.max_eval_examples=4",
                                      "eval.batch_size=4", "loss.chunk_size=50", "train.lr=0.01", "train.batch_size=3",
                                      "train.log_every=1", "train.eval_every=0", "eval.max_new_tokens=2", "device=cpu",
                                      "onpolicy.max_new_tokens=5", *extra])


def train_rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _batch():
    examples = [Example(10, [BOS, 20, 21, 22, 23], [IGNORE_INDEX, IGNORE_INDEX, 21, 22, 23]),
                Example(11, [BOS, 30, 31], [IGNORE_INDEX, IGNORE_INDEX, 31]),
                Example(12, [40, 41, 42], [IGNORE_INDEX, 41, 42])]  # no BOS: the context goes first
    return collate(examples, pad_id=0)


def test_teacher_view_puts_the_privileged_tokens_after_bos():
    view = with_teacher_view(_batch(), {10: [7, 8, 9], 12: [5]}, BOS)
    rows = [ids[: int(m.sum())] for ids, m in zip(view["teacher_input_ids"].tolist(), view["teacher_attention_mask"])]
    assert rows == [[BOS, 7, 8, 9, 20, 21, 22, 23], [BOS, 30, 31], [5, 40, 41, 42]]
    # student position t (predicting token t+1) → the teacher's position predicting the same token
    for row, (student, teacher) in enumerate(zip(view["input_ids"].tolist(), rows)):
        for t, pos in enumerate(view["teacher_positions"][row].tolist()):
            if t + 1 < len(teacher) and view["attention_mask"][row, t + 1]:
                assert teacher[pos + 1] == student[t + 1]
    assert with_teacher_view(_batch(), {99: [1]}, BOS).keys() == _batch().keys()  # no context in the batch: unchanged


def test_privileged_signal_equals_a_hand_built_teacher_forward(model_dirs, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    batch = with_teacher_view(_batch(), {10: [7, 8, 9], 12: [5]}, BOS)
    signal = privileged_signal(HiddenAndHead(teacher, len(tokenizer)), batch)
    logits = signal.chunk_logits(slice(None)).reshape(3, batch["input_ids"].shape[1] - 1, -1)
    hand = {0: [BOS, 7, 8, 9, 20, 21, 22, 23], 1: [BOS, 30, 31], 2: [5, 40, 41, 42]}
    offsets = {0: 3, 1: 0, 2: 1}
    for row, ids in hand.items():
        with torch.no_grad():
            expected = teacher(torch.tensor([ids])).logits[0]
        for t, label in enumerate(batch["labels"][row, 1:].tolist()):
            if label != IGNORE_INDEX:  # the teacher predicts the same token from its own position
                assert ids[t + offsets[row] + 1] == label
                torch.testing.assert_close(logits[row, t], expected[t + offsets[row]], rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _naive_fkl(teacher, student, batch) -> tuple[float, int]:
    """Σ over labelled student positions of KL(p‖q), the teacher reading its own (privileged) row."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            t_ids = batch["teacher_input_ids"][row, : int(batch["teacher_attention_mask"][row].sum())]
            offset = len(t_ids) - n
            q = F.log_softmax(student(batch["input_ids"][row : row + 1, :n]).logits[0].double(), -1)
            p = F.log_softmax(teacher(t_ids[None]).logits[0].double(), -1)
            for t in range(n - 1):
                if batch["labels"][row, t + 1] != IGNORE_INDEX:
                    total += float((p[t + offset].exp() * (p[t + offset] - q[t])).sum())
                    count += 1
    return total, count


@pytest.mark.parametrize("regime", ["offline", "onpolicy"])
def test_frozen_self_teacher_scores_at_the_privileged_positions(tmp_path, model_dirs, privileged_jsonl, monkeypatch, regime):
    """Step 1's fkl equals KL from a hand-built teacher forward on [BOS] + privileged + prompt + completion, where
    the completion is the data's (offline) or the student's rollout (onpolicy)."""
    seen, expected, batches = {}, [], []
    after_load(monkeypatch, lambda parts: seen.update(parts=parts))
    from potstill import train

    real = train.train_step

    def step(parts, par, micro, *args, **kwargs):
        if not expected:
            sums = [_naive_fkl(parts.teacher, parts.student, b) for b in micro]
            expected.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
            batches.extend(micro)
        return real(parts, par, micro, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    cfg = config(tmp_path, model_dirs, privileged_jsonl, "teacher.self_distill=frozen", f"data.regime={regime}",
                 "train.max_steps=2", "train.grad_accum=2")
    rows = train_rows(potstill.distill(cfg, progress=False).run_dir)
    assert rows[0]["loss"] == pytest.approx(expected[0], rel=1e-5) and expected[0] > 1e-3
    assert all("teacher_input_ids" in b for b in batches)
    if regime == "onpolicy":
        assert rows[0]["rollout/on_policy"] == 1.0


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ema_teacher_follows_the_reference_formula_and_frozen_never_moves(tmp_path, model_dirs, privileged_jsonl, monkeypatch):
    """EMA: T_k = d·T_{k-1} + (1 − d)·S_k after every step (fp64 reference, rel 1e-6); frozen: the initial student."""
    seen, students = {}, []
    after_load(monkeypatch, lambda parts: seen.update(parts=parts, initial=_state(parts.student)))
    real = regimes.Regime.after_step

    def after_step(regime):
        students.append(_state(regime.student))
        real(regime)

    monkeypatch.setattr(regimes.Regime, "after_step", after_step)
    potstill.distill(config(tmp_path, model_dirs, privileged_jsonl, "teacher.self_distill=ema", "teacher.ema_decay=0.7",
                            "train.max_steps=3", out="ema"), progress=False)
    reference = {k: v.double() for k, v in seen["initial"].items()}
    for s in students:
        reference = {k: 0.7 * v + 0.3 * s[k].double() for k, v in reference.items()}
    teacher = seen["parts"].teacher.state_dict()
    for k, v in reference.items():
        if v.is_floating_point():
            torch.testing.assert_close(teacher[k].double(), v, rtol=1e-6, atol=1e-6 * v.abs().max().item())
    assert len(students) == 3 and not torch.equal(teacher["transformer.h.0.mlp.c_fc.weight"], seen["initial"]["transformer.h.0.mlp.c_fc.weight"])

    students.clear()
    potstill.distill(config(tmp_path, model_dirs, privileged_jsonl, "teacher.self_distill=frozen", "train.max_steps=3",
                            out="frozen"), progress=False)
    frozen = seen["parts"].teacher.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in seen["initial"].items())
    assert not all(torch.equal(students[-1][k], v) for k, v in seen["initial"].items())  # the student did move


def test_ema_update_is_the_formula():
    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=1e-6, atol=0)


def test_live_teacher_is_the_student_in_eval_mode(tmp_path, model_dirs, privileged_jsonl, text_jsonl, dropout_student):
    """The live teacher's states are the student's own eval-mode forward (dropout off, mode restored); a live run
    without privileged context trains on KL(student‖itself) = 0, with it on a positive loss."""
    student = AutoModelForCausalLM.from_pretrained(dropout_student).train()
    ids = torch.tensor([[BOS, 20, 21, 22, 23]])
    h, _, _ = LiveTeacher(student, 479)(ids, torch.ones_like(ids), None)
    assert student.training
    student.eval()
    with torch.no_grad():
        expected = student.model(ids).last_hidden_state
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=0)
    priv = train_rows(potstill.distill(config(tmp_path, model_dirs, privileged_jsonl, "teacher.self_distill=live",
                                              "train.max_steps=2", out="priv"), progress=False).run_dir)
    assert all(r["loss"] > 1e-5 for r in priv)
    # without privileged context the student would be its own exact teacher (loss 0, nothing learnt): refused
    # before the run directory exists
    with pytest.raises(ValueError, match=r"^teacher.self_distill=live: none of the \d+ training records has a privileged_context"):
        potstill.distill(config(tmp_path, model_dirs, text_jsonl, "teacher.self_distill=live", out="plain"), progress=False)
    assert not (tmp_path / "plain").exists()


def test_resume_of_an_onpolicy_ema_self_distillation_is_exact(tmp_path, model_dirs, privileged_jsonl):
    """The EMA teacher's weights come back with the checkpoint: losses after resuming equal the uninterrupted run's."""
    cfg = config(tmp_path, model_dirs, privileged_jsonl, "teacher.self_distill=ema", "teacher.ema_decay=0.5",
                 "data.regime=onpolicy", "onpolicy.lam=0.5", "train.max_steps=6", "train.save_every=3",
                 "train.keep_checkpoints=3")
    full = potstill.distill(cfg, progress=False)
    before = train_rows(full.run_dir)
    simulate_crash(full.run_dir, 6, 4)
    again = train_rows(potstill.distill(cfg, resume=True, progress=False).run_dir)
    assert [r["loss"] for r in again] == [r["loss"] for r in before]


@pytest.mark.parametrize("extra,message", [
    (["teacher.self_distill=copy"], r"^teacher.self_distill='copy': use none, frozen, ema or live$"),
    (["teacher.self_distill=ema", "teacher.ema_decay=1"], r"^teacher.ema_decay must be in \[0, 1\), got 1"),
    (["teacher.self_distill=frozen", "teacher.path=t"], r"^teacher.self_distill=frozen: the student is its own teacher"),
    (["teacher.self_distill=live", "parallel.strategy=fsdp"], r"^teacher.self_distill=live with parallel.strategy=fsdp"),
])
def test_self_distill_settings_are_refused_in_one_line(extra, message):
    with pytest.raises(ValueError, match=message) as err:
        RunConfig.from_yaml(None, ["student.path=s", *extra])
    assert "\n" not in str(err.value)


def test_a_non_string_privileged_context_is_refused_naming_the_line(tmp_path, model_dirs):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": " b", "privileged_context": 3}) + "\n" * 2
                    + json.dumps({"text": "the dog"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'privileged_context' must be a string, got int"):
        potstill.distill(config(tmp_path, model_dirs, path, "teacher.self_distill=frozen", "train.max_steps=1",
                                "data.validation=" + str(path)), progress=False)


@pytest.mark.parametrize("extra,message", [
    (("data.packing=true", "teacher.self_distill=frozen"), "records with privileged_context give the teacher its own rows, which data.packing"),
    (("teacher.server_url=http://127.0.0.1:9", "teacher.server_model=t", "loss.objective=opd", "data.regime=onpolicy"),
     r"^\d+ training records carry privileged_context, which a teacher from teacher.server_url cannot read"),
])
def test_privileged_context_a_teacher_cannot_read_is_refused_before_anything_is_written(tmp_path, model_dirs,
                                                                                         privileged_jsonl, extra, message):
    """A teacher that would silently score the plain row (a server) or rows the context cannot be added to
    (packing) is refused before the run directory exists."""
    with pytest.raises(ValueError, match=message):
        potstill.distill(config(tmp_path, model_dirs, privileged_jsonl, "train.max_steps=1", *extra), progress=False)
    assert not (tmp_path / "run").exists()


def test_potstill_eval_of_a_self_distilled_run_has_no_teacher_metrics(tmp_path, model_dirs, privileged_jsonl):
    """Its teacher was a copy of the student: `potstill eval RUN` must not compare final/ with a copy of itself."""
    from potstill.evaluate_run import evaluate_path

    run = potstill.distill(config(tmp_path, model_dirs, privileged_jsonl, "teacher.self_distill=frozen",
                                  "train.max_steps=1"), progress=False)
    metrics = evaluate_path(run.run_dir)
    assert "kl_teacher_student" not in metrics and "acceptance_alpha" not in metrics and metrics["student_ce"] == pytest.approx(run.metrics["student_ce"], rel=1e-5)
    with_teacher = evaluate_path(run.run_dir, teacher=str(model_dirs["llama_teacher"]))
    assert with_teacher["kl_teacher_student"] > 0 and 0 < with_teacher["acceptance_alpha"] < 1
