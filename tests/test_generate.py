"""`potstill generate`: local and OpenAI-compatible backends, filters, resume, and the API-key rule."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from potstill.builtin.arithmetic import addition_rationale, arithmetic_examples
from potstill.cli import app
from potstill.config import GenerateConfig, RunConfig
from potstill.data.encode import encode_messages, encode_prompt_completion
from potstill.generation import generate
from potstill.generation.filters import Completion, Filters
from potstill.generation.local import derived_seed
from potstill.generation.prompts import load_prompts
from potstill.generation.text import chat_prompt_ids, completion_text
from potstill.labels import IGNORE_INDEX
from potstill.sampling import SamplingSettings, sample
from potstill.serving import build_app
from tests.serving_helpers import Flaky, request, running

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
SECRET = "sk-potstill-test-7f3a9c1e5b2d4086"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def arithmetic_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "arith.jsonl", arithmetic_examples("train", 60))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    records = [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sees"}], "id": "a"},
               {"messages": [{"role": "system", "content": "a dog"}, {"role": "user", "content": "the owl"}]}]
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", records)


def config(*overrides: str) -> RunConfig:
    return RunConfig.from_yaml(None, list(overrides), check_run=False)


def local(model_dirs, data: Path | str, out: Path, *more: str) -> RunConfig:
    return config(f"teacher.path={model_dirs['llama_teacher']}", f"data.train={data}", f"generate.out={out}",
                  "generate.max_new_tokens=10", "generate.keep_unfinished=true", "device=cpu", *more)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def env_with(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def potstill_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "potstill", *args]


# ---- local backend ------------------------------------------------------------------------------------------


def test_local_lines_are_the_seeded_batches_samples_and_train_back_to_the_same_tokens(tmp_path, model_dirs,
                                                                                       arithmetic_file, tokenizer):
    """Batch b of generate.batch_size prompts is sampled with seed derived_seed(seed, its first prompt id); each
    line is prompt + completion_text (+ passthrough answer); prompt + completion re-encoded for training gives
    exactly the sampled tokens (then EOS) as labels. A second run writes the same bytes."""
    settings = ["generate.n=2", "generate.batch_size=4", "generate.temperature=0.9", "generate.seed=5",
                "data.max_train_examples=10"]
    summary = generate(local(model_dirs, arithmetic_file, tmp_path / "a.jsonl", *settings))
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    records = arithmetic_examples("train", 10)
    expected, checked = [], 0
    for start in range(0, 10, 4):
        ids = [tokenizer(r["prompt"])["input_ids"] for r in records[start:start + 4]]
        out = sample(model, ids, SamplingSettings(10, 0.9, 1.0, 2), eos_ids=[tokenizer.eos_token_id],
                     pad_id=tokenizer.pad_token_id, seed=derived_seed(5, start))
        for row, (index, tokens, done) in enumerate(zip(out.prompt_index, out.tokens, out.finished)):
            record = records[start + index]
            content = tokens[:-1] if done else tokens
            text = completion_text(tokenizer, ids[index], content)
            expected.append({"prompt": record["prompt"], "completion": text, "prompt_id": start + index,
                             "sample": row % 2, "answer": record["answer"]})
            if all(t > 3 for t in content):  # no special token (the text skips those)
                encoded, labels = encode_prompt_completion(tokenizer, expected[-1], "line")
                assert [t for t in labels if t != IGNORE_INDEX] == content + [tokenizer.eos_token_id]
                checked += 1
    assert lines(tmp_path / "a.jsonl") == expected and checked >= 10
    assert (summary.kept, summary.failed, summary.lines) == (20, [], 20)
    generate(local(model_dirs, arithmetic_file, tmp_path / "b.jsonl", *settings))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_chat_records_need_a_chat_template(tmp_path, model_dirs, chat_file, tokenizer):
    plain = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    config_file = plain / "tokenizer_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "chat_template"}))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template to render them"):
        generate(config(f"teacher.path={plain}", f"data.train={chat_file}", f"generate.out={tmp_path / 'c.jsonl'}"))
    assert not (tmp_path / "c.jsonl").exists()


def test_chat_records_get_the_assistant_reply_appended(tmp_path, model_dirs, chat_file, tokenizer):
    generate(local(model_dirs, chat_file, tmp_path / "c.jsonl", "generate.temperature=0"))
    got = lines(tmp_path / "c.jsonl")
    assert [g["messages"][:-1] for g in got] == [[{"role": "user", "content": "the cat"}],
                                                [{"role": "system", "content": "a dog"}, {"role": "user", "content": "the owl"}]]
    assert got[0]["id"] == "a" and [g["prompt_id"] for g in got] == [0, 1]
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    for line in got:
        prompt = chat_prompt_ids(tokenizer, line["messages"][:-1])
        tokens = sample(model, [prompt], SamplingSettings(10, 0), eos_ids=[2], pad_id=0).tokens[0]
        assert line["messages"][-1] == {"role": "assistant", "content": completion_text(tokenizer, prompt, tokens)}
        encode_messages(tokenizer, line, "line")  # a record distill trains on


def test_local_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, model_dirs, arithmetic_file):
    """Kill a generate subprocess mid-run, leave half a line at the end (a write cut by the crash), rerun: the file
    is byte-identical to an uninterrupted run's."""
    settings = ["generate.n=2", "generate.batch_size=1", "generate.max_new_tokens=12", "generate.keep_unfinished=true",
                "generate.temperature=0.9", "device=cpu"]
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(potstill_cmd("generate", "--teacher", str(model_dirs["llama_teacher"]), "--data",
                                         str(arithmetic_file), "--out", str(killed), *settings),
                            env=env_with(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed.exists() and killed.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the generate subprocess ended early"
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait(30)
    assert killed.read_bytes().count(b"\n") < 120  # stopped mid-run
    with killed.open("ab") as fh:
        fh.write(b'{"prompt": "what is 1')
    resumed = generate(local(model_dirs, arithmetic_file, killed, *settings))
    generate(local(model_dirs, arithmetic_file, tmp_path / "full.jsonl", *settings))
    assert killed.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert resumed.already_done + resumed.kept == 120 and resumed.already_done >= 3


def test_filters_in_order_with_a_reason_each():
    prompts = load_prompts("builtin:arithmetic", 2)
    g = GenerateConfig(checker="arithmetic", dedup=True, min_tokens=3, max_tokens=40)
    filters = Filters(g, prompts)
    right = " " + addition_rationale(*map(int, prompts[0].prompt.split("?")[0][8:].replace(" ", "").split("+")))
    cases = [(Completion(0, 0, right, 30, False), set(), "unfinished"),
             (Completion(0, 0, right, 2, True), set(), "too_short"),
             (Completion(0, 0, right, 41, True), set(), "too_long"),
             (Completion(0, 0, right.replace("answer", "answer 9"), 30, True), set(), "checker"),
             (Completion(0, 0, " answer 1", 30, True), set(), "checker"),
             (Completion(0, 0, right, 30, True), {right}, "duplicate"),
             (Completion(0, 0, right, 30, True), {"other"}, None),
             (Completion(0, 0, right, 40, True), set(), None)]
    for completion, kept, reason in cases:
        assert filters.reason(prompts[0], completion, kept) == reason, (completion, reason)
    assert right.split()[-len(prompts[0].extra["answer"]):] == list(prompts[0].extra["answer"])


def test_filter_counts_match_the_rejected_file_and_a_rerun_draws_nothing_again(tmp_path, model_dirs, arithmetic_file):
    """Greedy with n=3 and dedup: one kept, two duplicates per prompt; an unfinished bound and a length bound
    reject the rest; the summary's counts equal OUT.rejected.jsonl's reasons, and a rerun generates nothing."""
    out = tmp_path / "f.jsonl"
    cfg = local(model_dirs, arithmetic_file, out, "generate.n=3", "generate.temperature=0", "generate.dedup=true",
                "data.max_train_examples=6")
    summary = generate(cfg)
    assert summary.kept == 6 and summary.filtered == Counter(duplicate=12)
    rejected = lines(out.with_name("f.jsonl.rejected.jsonl"))
    assert Counter(r["reason"] for r in rejected) == summary.filtered
    assert {(r["prompt_id"], r["sample"]) for r in rejected} == {(p, s) for p in range(6) for s in (1, 2)}
    again = generate(cfg)
    assert (again.kept, sum(again.filtered.values()), again.already_done, again.lines) == (0, 0, 18, 6)
    bounded = generate(local(model_dirs, arithmetic_file, tmp_path / "g.jsonl", "generate.max_tokens=9",
                             "data.max_train_examples=6"))
    strict = generate(local(model_dirs, arithmetic_file, tmp_path / "h.jsonl", "generate.keep_unfinished=false",
                            "data.max_train_examples=6"))
    unfinished = strict.filtered["unfinished"]
    assert bounded.filtered["too_long"] == unfinished and strict.kept + unfinished == 6  # all unfinished run to 10 tokens


def test_changed_settings_are_refused_by_name_unless_overwrite(tmp_path, model_dirs, arithmetic_file):
    args = ["generate", "--teacher", str(model_dirs["llama_teacher"]), "--data", str(arithmetic_file), "--out",
            str(tmp_path / "o.jsonl"), "data.max_train_examples=2", "generate.max_new_tokens=4", "device=cpu",
            "generate.keep_unfinished=true"]
    assert runner.invoke(app, args).exit_code == 0
    changed = runner.invoke(app, [*args, "generate.temperature=0.5"])
    assert changed.exit_code == 2
    assert "generate.temperature: 1.0 → 0.5" in changed.output.strip().splitlines()[-1]
    more = runner.invoke(app, [*args, "data.max_train_examples=3"])  # more prompts extend the run
    assert more.exit_code == 0 and len(lines(tmp_path / "o.jsonl")) == 3
    replaced = runner.invoke(app, [*args, "generate.temperature=0.5", "--overwrite"])
    assert replaced.exit_code == 0 and len(lines(tmp_path / "o.jsonl")) == 2
    assert json.loads((tmp_path / "o.jsonl.meta.json").read_text())["generate.temperature"] == 0.5


@pytest.mark.parametrize("args, says", [
    (["--backend", "openai", "--model", "m", "generate.api_key_env=POTSTILL_TEST_NO_SUCH_KEY"],
     "generate.api_key_env: the environment variable POTSTILL_TEST_NO_SUCH_KEY is not set"),
    (["--backend", "opneai"], "generate.backend='opneai': use one of local, openai, vllm"),
    (["--data", "builtin"], "data.train=builtin holds text documents"),
    (["--data", "TEXT"], ".jsonl:1: a text record has no prompt to complete"),
    (["generate.checker=arithmetic", "--data", "CHAT"], "needs an 'answer' field in every record; record 0"),
    (["--backend", "openai", "--model", "m", "--data", "CHAT", "generate.endpoint=completions"], "data.train has chat records"),
    (["generate.top_p=0"], "generate.top_p must be in (0, 1]"),
    (["--backend", "vllm"], "generate.backend=vllm needs vLLM installed"),
], ids=["missing-key", "unknown-backend", "builtin-text", "text-records", "checker-no-answer", "chat-to-completions",
        "top-p", "vllm"])
def test_bad_inputs_end_in_one_line_with_exit_code_2(tmp_path, model_dirs, chat_file, args, says, monkeypatch):
    if "vllm" in args and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat"}])
    args = [{"TEXT": str(text), "CHAT": str(chat_file)}.get(a, a) for a in args]
    base = ["generate", "--teacher", str(model_dirs["llama_teacher"]), "--data", str(chat_file), "--out",
            str(tmp_path / "x.jsonl"), "device=cpu"]
    result = runner.invoke(app, [*base, *args])
    output = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(output) == 1 and output[0].startswith("error:"), result.output
    assert says in output[0]
    assert not (tmp_path / "x.jsonl").exists()  # refused before any file is touched


def test_a_distill_resume_ignores_the_generate_section(tmp_path):
    """generate.* keys do not change a training trajectory: a run whose config.yaml predates the section (or sets
    other generate values) resumes; a training key still refuses."""
    from potstill.rundir import RunDirError, check_resume_config

    run = tmp_path / "run"
    (run / "checkpoints" / "step-1" / "potstill").mkdir(parents=True)
    (run / "checkpoints" / "step-1" / "potstill" / "trainer_state.pt").write_bytes(b"")
    base = ["student.init_from_teacher_layers=1", "teacher.path=t"]
    saved = RunConfig.from_yaml(None, base, check_run=False).to_dict()
    del saved["generate"]
    (run / "config.yaml").write_text(json.dumps(saved))
    check_resume_config(run, RunConfig.from_yaml(None, [*base, "generate.n=4"], check_run=False))
    with pytest.raises(RunDirError, match="train.lr"):
        check_resume_config(run, RunConfig.from_yaml(None, [*base, "train.lr=1"], check_run=False))


# ---- the OpenAI-compatible backend ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model_dirs):
    """`python -m potstill serve` as a real subprocess on a free port; yields (base URL, its output lines)."""
    proc = subprocess.Popen(potstill_cmd("serve", str(model_dirs["llama_teacher"]), "--port", "0", "--model-name",
                                         "tiny", "--device", "cpu"), env=env_with(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    try:
        first = proc.stdout.readline()
        output.append(first)
        match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", first)
        assert match, f"potstill serve did not announce its address: {first!r}"
        threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
        url = match.group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(f"{url}/models", timeout=5)[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "".join(output)
                time.sleep(0.1)
        yield url, output
    finally:
        proc.terminate()
        proc.wait(30)


def remote(url: str, data: Path, out: Path, *more: str) -> RunConfig:
    return config("generate.backend=openai", f"generate.base_url={url}", "generate.model=tiny", f"data.train={data}",
                  f"generate.out={out}", "generate.max_new_tokens=6", "generate.keep_unfinished=true", *more)


def test_generate_through_a_potstill_serve_subprocess(tmp_path, served, model_dirs, arithmetic_file, chat_file,
                                                     tokenizer, monkeypatch):
    """Chat endpoint, n=2, concurrency 3: every pair is there once, and each completion is exactly what the
    sampler gives the chat-rendered prompt with the request's derived seed; chat records get the reply appended."""
    url, _ = served
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "r.jsonl"
    summary = generate(remote(url, arithmetic_file, out, "generate.n=2", "generate.concurrency=3",
                              "data.max_train_examples=4", "generate.seed=9"))
    got = sorted(lines(out), key=lambda r: (r["prompt_id"], r["sample"]))
    assert [(r["prompt_id"], r["sample"]) for r in got] == [(p, s) for p in range(4) for s in range(2)]
    assert (summary.kept, summary.tokens) == (8, 48)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    records = arithmetic_examples("train", 4)
    for r in got:
        prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": records[r["prompt_id"]]["prompt"]}])
        tokens = sample(model, [prompt], SamplingSettings(6, 1.0), eos_ids=[2], pad_id=0,
                        seed=derived_seed(9, r["prompt_id"], r["sample"])).tokens[0]
        user = {"role": "user", "content": records[r["prompt_id"]]["prompt"]}  # the turn the teacher answered
        assert r["messages"] == [user, {"role": "assistant", "content": completion_text(tokenizer, prompt, tokens)}]
        assert r["answer"] == records[r["prompt_id"]]["answer"]
    generate(remote(url, chat_file, tmp_path / "chat.jsonl", "generate.temperature=0"))
    chat = sorted(lines(tmp_path / "chat.jsonl"), key=lambda r: r["prompt_id"])  # written as requests complete
    assert [len(r["messages"]) for r in chat] == [2, 3]
    deadline = time.monotonic() + 30  # the server's output is read by a thread: wait for its lines
    while "POST /v1/chat/completions" not in "".join(served[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    server_log = "".join(served[1])
    assert "POST /v1/chat/completions" in server_log and "chat.completions: 1 prompt(s)" in server_log
    assert SECRET not in server_log  # the Bearer token it received is never logged


def test_remote_resume_after_a_line_cut_mid_write(tmp_path, served, arithmetic_file, monkeypatch):
    url, _ = served
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    generate(remote(url, arithmetic_file, full, "generate.n=2", "data.max_train_examples=5", "generate.concurrency=2"))
    text = full.read_text()
    kept = text.splitlines(keepends=True)[:4]
    cut.write_text("".join(kept) + text.splitlines()[4][:25])
    cut.with_name("cut.jsonl.meta.json").write_text(full.with_name("full.jsonl.meta.json").read_text())
    resumed = generate(remote(url, arithmetic_file, cut, "generate.n=2", "data.max_train_examples=5"))
    assert (resumed.already_done, resumed.kept) == (4, 6)
    assert sorted(cut.read_text().splitlines()) == sorted(text.splitlines())  # same seeds → same lines, none twice


@pytest.fixture
def tiny_app(model_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama_teacher"]).eval()
    return build_app(model, tokenizer, "tiny")


def test_a_request_slower_than_the_timeout_is_retried(tmp_path, tiny_app, arithmetic_file, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    flaky = Flaky(tiny_app, delay=1, seconds=120)
    with running(flaky) as url:
        summary = generate(remote(f"{url}/v1", arithmetic_file, tmp_path / "t.jsonl", "data.max_train_examples=1",
                                  "generate.timeout=4", "generate.max_retries=1"))
    assert flaky.calls == 2 and summary.kept == 1 and not summary.failed
    assert len(lines(tmp_path / "t.jsonl")) == 1


def test_a_server_error_is_retried_with_each_attempt_counted(tmp_path, tiny_app, arithmetic_file, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    flaky = Flaky(tiny_app, fail=2, status=500)
    with running(flaky) as url:
        summary = generate(remote(f"{url}/v1", arithmetic_file, tmp_path / "e.jsonl", "data.max_train_examples=1",
                                  "generate.max_retries=2"))
    assert flaky.calls == 3 and summary.kept == 1 and not summary.failed


def test_requests_failing_after_the_retries_are_reported_and_retried_by_the_next_run(tmp_path, tiny_app, arithmetic_file,
                                                                                    monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    flaky = Flaky(tiny_app, fail=10**6, status=503)
    args = ["generate", "--backend", "openai", "--model", "tiny", "--data", str(arithmetic_file), "--out",
            str(tmp_path / "x.jsonl"), "data.max_train_examples=2", "generate.max_retries=1", "generate.concurrency=1",
            "generate.max_new_tokens=4", "generate.keep_unfinished=true"]
    with running(flaky) as url, caplog.at_level("WARNING", logger="potstill"):
        failed = runner.invoke(app, [*args, "--base-url", f"{url}/v1"])
        assert flaky.calls == 4  # 2 pairs × (1 + 1 retry)
        assert failed.exit_code == 2
        assert failed.output.strip().splitlines()[-1] == ("error: 2 request(s) failed after the retries "
                                                         "(prompt_id/sample: 0/0, 1/0); rerun the same command to retry them")
        assert "prompt 0 sample 0 failed after the retries: HTTP 503" in caplog.text
        assert (tmp_path / "x.jsonl").read_text() == ""
        flaky.fail = 0
        again = runner.invoke(app, [*args, "--base-url", f"{url}/v1"])
    assert again.exit_code == 0 and len(lines(tmp_path / "x.jsonl")) == 2


def test_a_wrong_model_name_stops_the_run_at_once(tmp_path, tiny_app, arithmetic_file, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    flaky = Flaky(tiny_app)
    with running(flaky) as url:
        result = runner.invoke(app, ["generate", "--backend", "openai", "--model", "nope", "--base-url", f"{url}/v1",
                                     "--data", str(arithmetic_file), "--out", str(tmp_path / "w.jsonl"),
                                     "generate.concurrency=1", "data.max_train_examples=5"])
    assert result.exit_code == 2 and "the server refused the request (HTTP 404" in result.output
    assert flaky.calls == 1


def test_the_api_key_is_never_written_or_logged(tmp_path, tiny_app, arithmetic_file, caplog):
    """A generate subprocess with --debug, a unique key and one request failing for good: the key reaches the
    server as the Bearer token and appears in no file under tmp, in no output line, in no server log line."""
    flaky = Flaky(tiny_app, fail=1, status=500)
    with running(flaky) as url, caplog.at_level("DEBUG"):
        done = subprocess.run(potstill_cmd("--debug", "generate", "--backend", "openai", "--model", "tiny",
                                           "--base-url", f"{url}/v1", "--data", str(arithmetic_file), "--out",
                                           str(tmp_path / "k.jsonl"), "data.max_train_examples=3",
                                           "generate.max_retries=0", "generate.concurrency=1",
                                           "generate.api_key_env=POTSTILL_TEST_KEY", "generate.max_new_tokens=4",
                                           "generate.keep_unfinished=true"),
                              env=env_with(POTSTILL_TEST_KEY=SECRET), capture_output=True, text=True, timeout=240,
                              cwd=tmp_path)
    assert done.returncode == 2 and "1 request(s) failed" in done.stderr and "Traceback" in done.stderr
    assert flaky.auth == [f"Bearer {SECRET}"] * 3
    assert len(lines(tmp_path / "k.jsonl")) == 2
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in done.stdout + done.stderr and SECRET not in caplog.text
    assert "POTSTILL_TEST_KEY" not in (tmp_path / "k.jsonl.meta.json").read_text()


def test_distill_trains_on_the_generated_file(tmp_path, model_dirs, arithmetic_file):
    """Sequence-level KD end to end: generate with the teacher, then `potstill distill` on gen.jsonl (label CE plus
    a live-teacher term) runs and writes a student."""
    out = tmp_path / "gen.jsonl"
    generate(local(model_dirs, arithmetic_file, out, "generate.n=2", "data.max_train_examples=8"))
    result = runner.invoke(app, ["distill", "--teacher", str(model_dirs["llama_teacher"]), "--student",
                                 str(model_dirs["gpt2_student"]), "--data", str(out), "--objective", "0.5*ce + 0.5*fkl",
                                 "--steps", "2", "--out", str(tmp_path / "run"), "train.batch_size=4", "device=cpu",
                                 "train.report_to=none", "data.max_length=64"])
    assert result.exit_code == 0, result.output
    assert "data: 15 training examples from" in result.output  # 16 lines, every k-th held out for evaluation
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_a_partial_last_line_is_cut_at_the_last_newline_only(tmp_path):
    from potstill.generation.store import cut_partial_last_line

    path = tmp_path / "f.jsonl"
    whole = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 5000) for i in range(40))  # > one 64 KiB block
    for tail, cut in ((b'{"n": 40, "pa', True), (b"", False)):
        path.write_bytes(whole + tail)
        assert cut_partial_last_line(path) is cut and path.read_bytes() == whole
    path.write_bytes(b'{"only": "partial')
    assert cut_partial_last_line(path) and path.read_bytes() == b""


def test_builtin_arithmetic_prompts_are_the_records_distill_reads():
    """prompt_id N of `generate --data builtin:arithmetic` is example N of `distill data.train=builtin:arithmetic`."""
    from potstill.data.loading import load_records
    from potstill.generation.prompts import load_prompts

    records = load_records("builtin:arithmetic", "train", 20)
    prompts = load_prompts("builtin:arithmetic", 20)
    assert [(p.prompt_id, p.prompt, p.extra["answer"]) for p in prompts] == [(n, r["prompt"], r["answer"]) for n, r in records]
