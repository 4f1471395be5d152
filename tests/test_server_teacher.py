"""The server teacher: echoed prompt log-probs (the vLLM-compatible completions format) → the batch's teacher
signal, placed like the live teacher's; what the server signal cannot serve is refused at config load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.config import RunConfig
from potstill.losses.targets import TokenLogprobs, TopKTail, top_k_with_tail
from potstill.server_teacher import ServerTeacherError, batch_signal, parse_choice, real_positions

URL = "http://127.0.0.1:1"


def _choice(ids: list[int], logp: torch.Tensor, k: int) -> dict:
    """A choice's ``logprobs`` in the documented format for prompt ``ids`` whose next-token log-probs (L, V) are
    ``logp`` (row j predicts token j + 1): token j ≥ 1 is scored by row j − 1; the first token is not scored."""
    top = [None] + [{f"token_id:{i}": float(lp) for lp, i in zip(*logp[j - 1].topk(k))} for j in range(1, len(ids))]
    return {"tokens": [f"token_id:{i}" for i in ids],
            "token_logprobs": [None] + [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))],
            "top_logprobs": top}


def _batch(v=13, seed=0):
    """A right-padded batch of 3 rows (lengths 6, 4, 2) with next-token log-probs (B, T, V) for each position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (3, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    labels = torch.where(mask.bool(), ids, -100)
    labels[0, :2] = -100  # a masked prompt
    logp = F.log_softmax(2 * torch.randn(3, 6, v, generator=g), -1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, logp


@pytest.mark.parametrize("k", [0, 3])
def test_server_scores_become_the_live_teachers_signal_at_every_labelled_position(k):
    batch, logp = _batch()
    positions = real_positions(batch)
    rows = [parse_choice(_choice(batch["input_ids"][b, pos].tolist(), logp[b, pos], max(k, 1)),
                         batch["input_ids"][b, pos].tolist(), k, URL) for b, pos in enumerate(positions)]
    target = batch_signal(rows, positions, (3, 5), k, vocab=13)
    labels = batch["labels"][:, 1:].reshape(-1)
    valid = labels != -100
    live = logp[:, :-1].reshape(-1, 13)  # position t predicts token t + 1
    if k == 0:
        assert isinstance(target, TokenLogprobs)
        expected = live.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
        torch.testing.assert_close(target.logp[valid], expected[valid], rtol=0, atol=0)
        padding = ~batch["attention_mask"][:, 1:].bool().reshape(-1)  # no real token to score: a finite filler
        assert torch.isfinite(target.logp).all() and (target.logp[padding] == 0).all()
    else:
        assert isinstance(target, TopKTail) and target.temperature == 1.0
        ids, top, tail = top_k_with_tail(live, k)  # what a top-k cache of the same teacher stores
        scored = torch.cat([pos[1:] - 1 + 5 * b for b, pos in enumerate(positions)])
        torch.testing.assert_close(target.ids[scored], ids[scored], rtol=0, atol=0)
        torch.testing.assert_close(target.logprobs[scored], top[scored], rtol=0, atol=0)
        torch.testing.assert_close(target.tail_mass[scored], tail[scored], rtol=0, atol=0)
        unscored = torch.ones(15, dtype=torch.bool).index_fill_(0, scored, False)
        assert torch.isclose(target.tail_mass[unscored], torch.tensor(0.25)).all()  # the uniform k + 1-bin filler


def test_a_server_that_does_not_score_the_sent_ids_is_refused():
    batch, logp = _batch()
    ids = batch["input_ids"][0].tolist()
    choice = _choice(ids, logp[0], 2)
    with pytest.raises(ServerTeacherError, match="echoed other tokens than it was sent"):
        parse_choice(choice, ids[:-1] + [ids[-1] + 1], 0, URL)
    with pytest.raises(ServerTeacherError, match="not 'token_id:N'"):
        parse_choice({**choice, "tokens": ["hello"] * len(ids)}, ids, 0, URL)
    with pytest.raises(ServerTeacherError, match="left prompt tokens unscored"):
        parse_choice({**choice, "token_logprobs": [None] * len(ids)}, ids, 0, URL)
    with pytest.raises(ServerTeacherError, match="fewer than teacher.server_top_k=3"):
        parse_choice(choice, ids, 3, URL)


def _cfg(*extra):
    return RunConfig.from_yaml(None, ["teacher.server_url=http://127.0.0.1:9", "teacher.server_model=t",
                                      "student.config={model_type: llama}", *extra])


@pytest.mark.parametrize("extra,message", [
    (["loss.objective=fkl"], "gives only the teacher's log-prob of each label token, which serves opd and ce; fkl need"),
    (["loss.objective=opd", "teacher.server_top_k=4"], "lacks the teacher's log-prob of each label token, which opd needs"),
    (["loss.objective=opd", "loss.temperature=2"], "scores at T = 1"),
    (["loss.objective=opd", "teacher.cache=/x"], "teacher.server_url or teacher.cache, not both"),
    (["loss.objective=opd", "data.packing=true"], "data.packing"),
    (["loss.objective=opd", "teacher.server_top_k=-1"], "server_top_k must be ≥ 0"),
    (["loss.objective=opd", "teacher.api_key_env=POTSTILL_TEST_UNSET_KEY"], "POTSTILL_TEST_UNSET_KEY is not set"),
    (["loss.objective=opd", "teacher.server_model="], "needs teacher.server_model"),
    (["loss.objective=opd", "teacher.api_key_env=sk-pasted-secret-77"], r"must be the NAME of an environment variable .*not shown$"),
    (["loss.objective=fkl", "teacher.server_top_k=4", "loss.select=entropy"], None),
    (["loss.objective=0.5*ce + opd", "data.regime=onpolicy"], None),
    (["loss.objective=opd"], "on the student's own samples: set data.regime=onpolicy and onpolicy.lam=1"),
    (["loss.objective=opd", "data.regime=onpolicy", "onpolicy.lam=0.5"], "set data.regime=onpolicy and onpolicy.lam=1"),
    (["loss.objective=opd", "data.regime=onpolicy", "onpolicy.temperature=0"], "set onpolicy.temperature > 0"),
])
def test_what_the_server_signal_cannot_serve_is_refused_at_config_load(extra, message):
    if message is None:
        _cfg(*extra)  # served: loads
        return
    with pytest.raises(ValueError, match=message) as err:
        _cfg(*extra)
    assert "sk-pasted-secret-77" not in str(err.value)  # a key pasted in place of a variable name is never repeated


# ---- against a real server: `potstill serve`'s app on a free port, started by the test --------------------------

import json  # noqa: E402
import logging  # noqa: E402

from serving_helpers import Flaky, running  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import potstill  # noqa: E402
from potstill.server_teacher import ServerTeacher  # noqa: E402
from potstill.serving import build_app  # noqa: E402


@pytest.fixture(scope="module")
def teacher_model(model_dirs):
    return AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()


def _run_cfg(tmp_path, model_dirs, data, name, *extra):
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['qwen2_student']}",
                                      f"data.train={data}", "data.max_length=40", "data.max_eval_examples=8",
                                      "data.max_train_examples=24", "train.batch_size=4", "train.max_steps=4",
                                      "train.log_every=1", "train.eval_every=0", "train.lr=0.01",
                                      "eval.max_new_tokens=3", f"out_dir={tmp_path / name}", *extra])


def _train_rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


# opd trains on the student's own samples: one on-policy step, so both runs sample from the same initial weights
# (later steps' weights differ by the server's float rounding, which could flip a draw); rkl offline, four steps.
ONPOLICY_STEP = ("data.regime=onpolicy", "onpolicy.max_new_tokens=12", "train.max_steps=1")


@pytest.mark.parametrize("objective,top_k,extra", [("opd", 0, ONPOLICY_STEP), ("0.5*ce + opd", 0, ONPOLICY_STEP),
                                                   ("rkl", "V", ())])
def test_distill_with_a_served_teacher_equals_the_live_teacher(tmp_path, model_dirs, text_jsonl, tokenizer,
                                                               teacher_model, objective, top_k, extra):
    """The same run with the teacher's weights behind `potstill serve`: every step's loss and term values equal the
    live teacher's at rel 1e-4. Label log-probs only (opd, on the student's rollouts) and the top-k target with
    k = V (where the k + 1 bins are the dense teacher exactly: rkl)."""
    k = len(tokenizer) if top_k == "V" else top_k
    live = potstill.distill(_run_cfg(tmp_path, model_dirs, text_jsonl, "live", f"loss.objective={objective}", *extra),
                            progress=False)
    with running(build_app(teacher_model, tokenizer, "teacher", max_logprobs=max(k, 1))) as url:
        served = potstill.distill(_run_cfg(tmp_path, model_dirs, text_jsonl, "served", f"loss.objective={objective}",
                                           f"teacher.server_url={url}", "teacher.server_model=teacher",
                                           f"teacher.server_top_k={k}", *extra), progress=False)
    live_rows, served_rows = _train_rows(live.run_dir), _train_rows(served.run_dir)
    assert len(served_rows) == (1 if extra else 4)
    assert ("rollout/gen_length" in served_rows[0]) == bool(extra)  # opd: trained on the student's rollout
    for a, b in zip(live_rows, served_rows):
        keys = ["loss", *[key for key in a if key.startswith("term/")]]
        assert len(keys) == 1 + objective.count("+") + 1  # the loss and each term's mean
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert "teacher_ce" not in served.metrics  # the teacher's weights never loaded in the training process


def test_a_failing_server_is_retried_then_refused_in_one_line(tokenizer, teacher_model):
    ids = [[1, 20, 31, 44], [1, 7, 7]]
    flaky = Flaky(build_app(teacher_model, tokenizer, "teacher"), fail=2, status=503)
    with running(flaky) as url:
        scores = ServerTeacher(url, "teacher", timeout=30).score(ids)
    assert flaky.calls == 3 and [len(s.token_logprobs) for s in scores] == [3, 2]
    broken = Flaky(build_app(teacher_model, tokenizer, "teacher"), fail=100, status=500)
    with running(broken) as url:
        with pytest.raises(ServerTeacherError, match=f"teacher server {url}: InternalServerError") as err:
            ServerTeacher(url, "teacher", timeout=30).score(ids)
    assert "\n" not in str(err.value) and broken.calls == 4  # the first try and 3 retries


def test_a_slow_server_times_out(tokenizer, teacher_model):
    slow = Flaky(build_app(teacher_model, tokenizer, "teacher"), delay=100, seconds=2.0)
    with running(slow) as url:
        teacher = ServerTeacher(url, "teacher", timeout=0.5, max_retries=1)
        with pytest.raises(ServerTeacherError, match="APITimeoutError"):
            teacher.score([[1, 2, 3]])


def test_the_api_key_is_never_written(tmp_path, model_dirs, text_jsonl, tokenizer, teacher_model, monkeypatch, caplog):
    secret = "sk-potstill-test-4f1c9a"
    monkeypatch.setenv("POTSTILL_TEST_TEACHER_KEY", secret)
    with caplog.at_level(logging.DEBUG), running(build_app(teacher_model, tokenizer, "teacher")) as url:
        run = potstill.distill(_run_cfg(tmp_path, model_dirs, text_jsonl, "keyed", "loss.objective=opd", "data.regime=onpolicy",
                                        "train.max_steps=2", f"teacher.server_url={url}", "teacher.server_model=teacher",
                                        "teacher.api_key_env=POTSTILL_TEST_TEACHER_KEY"), progress=False)
    files = [p for p in run.run_dir.rglob("*") if p.is_file()]
    assert files and not [p for p in files if secret.encode() in p.read_bytes()]
    assert secret not in caplog.text
    assert "POTSTILL_TEST_TEACHER_KEY" in (run.run_dir / "config.yaml").read_text()  # only the variable's name
