"""On-policy KD in the one loop (data.regime=onpolicy): λ, rollouts as batches, the loss on generated tokens, the
rollout metrics, exact resume and the EOS guard (docs/onpolicy.md)."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

import potstill
from potstill import runtime, train
from potstill.config import RunConfig
from potstill.labels import IGNORE_INDEX
from potstill.onpolicy import regime as regimes
from potstill.onpolicy.rollouts import rollout_seed
from potstill.sampling import SamplingSettings, sample

from conftest import after_load, builtin_prompt_completion_jsonl, save_tiny_model, simulate_crash

PROMPT_TOKENS = 3
MAX_NEW = 6


def config(tmp_path, model_dirs, data, *extra, student="qwen2_student", out="run"):
    student = model_dirs.get(student, student)
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={student}",
                                      f"data.train={data}", f"out_dir={tmp_path / out}", "data.max_length=24",
                                      "data.max_eval_examples=4", "eval.batch_size=4", "loss.chunk_size=50",
                                      "train.lr=0.01", "train.batch_size=3", "train.log_every=1", "train.eval_every=0",
                                      "eval.max_new_tokens=2", "device=cpu", f"onpolicy.prompt_tokens={PROMPT_TOKENS}",
                                      f"onpolicy.max_new_tokens={MAX_NEW}", *extra])


def train_rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def pc_jsonl(tmp_path_factory):
    """prompt/completion records (the prompt is the first few words of a built-in document)."""
    return builtin_prompt_completion_jsonl(tmp_path_factory.mktemp("pc") / "train.jsonl", 40, 4, 6)


class Recorder:
    """Records, per step, the data micro-batches, what the regime made of them, and an independent re-sample of the
    same prompts with the same seeds by the same (not yet updated) student."""

    def __init__(self, monkeypatch, resample: bool = True):
        self.steps = []
        real = regimes.Regime.prepare
        recorder = self

        def prepare(regime, step, micro):
            data = [{k: v.clone() for k, v in b.items()} for b in micro]
            out = real(regime, step, micro)
            again = [recorder.resample(regime, step, i, b) for i, b in enumerate(data)] if resample else None
            recorder.steps.append({"step": step, "mode": regime.mode, "data": data, "out": out, "again": again})
            return out

        monkeypatch.setattr(regimes.Regime, "prepare", prepare)

    @staticmethod
    def resample(regime, step, index, batch):
        """Prompts by the definition (text: BOS + N tokens; else the tokens before the first label), sampled alone."""
        prompts = []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            n = 1 + PROMPT_TOKENS if labels[0] != IGNORE_INDEX else next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
            prompts.append(ids[:n])
        student = regime.student
        student.eval()
        try:
            out = sample(student, prompts, SamplingSettings(MAX_NEW, regime.cfg.onpolicy.temperature, regime.cfg.onpolicy.top_p),
                         eos_ids=regime.eos_ids, pad_id=regime.pad_id, seed=rollout_seed(regime.cfg.train.seed, step, 0, index))
        finally:
            student.train()
        return prompts, out


def labelled(batch, row):
    """(position, token) of every labelled position of a row."""
    return [(i, t) for i, t in enumerate(batch["labels"][row].tolist()) if t != IGNORE_INDEX]


def test_lambda_zero_equals_the_offline_run(tmp_path, model_dirs, text_jsonl):
    offline = potstill.distill(config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", out="off"), progress=False)
    zero = potstill.distill(config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", "data.regime=onpolicy",
                                   "onpolicy.lam=0", out="zero"), progress=False)
    a, b = train_rows(offline.run_dir), train_rows(zero.run_dir)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical
    assert [r["rollout/on_policy"] for r in b] == [0.0] * 4 and [r["rollout/seconds_share"] for r in b] == [0.0] * 4


@pytest.mark.parametrize("data", ["text", "prompt_completion"])
def test_lambda_one_trains_only_on_the_students_own_samples(tmp_path, model_dirs, text_jsonl, pc_jsonl, monkeypatch, data):
    """Every labelled token of every step is a token the student sampled (equal to a re-sample of the same prompt
    with the same seed), the prompt is never labelled, and the row is prompt + completion."""
    rec = Recorder(monkeypatch)
    path = text_jsonl if data == "text" else pc_jsonl
    result = potstill.distill(config(tmp_path, model_dirs, path, "train.max_steps=3", "train.grad_accum=2",
                                     "data.regime=onpolicy", "onpolicy.temperature=1.5"), progress=False)
    assert [s["mode"] for s in rec.steps] == ["fresh"] * 3
    for s in rec.steps:
        for batch, data_batch, (prompts, again) in zip(s["out"], s["data"], s["again"]):
            assert batch["example_id"].tolist() == data_batch["example_id"].tolist()
            for row, (prompt, tokens) in enumerate(zip(prompts, again.tokens)):
                assert batch["input_ids"][row, : len(prompt) + len(tokens)].tolist() == prompt + tokens
                assert batch["attention_mask"][row].sum() == len(prompt) + len(tokens)
                assert labelled(batch, row) == [(len(prompt) + i, t) for i, t in enumerate(tokens)]
    assert all(r["rollout/on_policy"] == 1.0 and 0 < r["rollout/seconds_share"] < 1 for r in train_rows(result.run_dir))


def _naive_rkl(student, teacher, batch) -> tuple[float, int]:
    """(Σ over labelled positions of KL(q‖p) = Σ_v q (log q − log p), their count), from the models' full logits."""
    with torch.no_grad():
        q = F.log_softmax(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double(), -1)
        p = F.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double(), -1)
    per_token = (q.exp() * (q - p)).sum(-1)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return float(per_token[mask].sum()), int(mask.sum())


def test_loss_on_rollouts_equals_the_objective_computed_naively(tmp_path, model_dirs, pc_jsonl, monkeypatch):
    """Step 1's loss (rkl over two micro-batches of rollouts) equals KL(student‖teacher) from full logits."""
    seen = {}
    after_load(monkeypatch, lambda parts: seen.update(parts=parts))
    real = train.train_step
    expected = []

    def step(parts, par, batches, *args, **kwargs):
        if not expected:
            sums = [_naive_rkl(parts.student, parts.teacher, b) for b in batches]
            expected.append(sum(s for s, _ in sums) / sum(n for _, n in sums))
        return real(parts, par, batches, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    result = potstill.distill(config(tmp_path, model_dirs, pc_jsonl, "train.max_steps=1", "train.grad_accum=2",
                                     "data.regime=onpolicy", "loss.objective=rkl"), progress=False)
    assert train_rows(result.run_dir)[0]["loss"] == pytest.approx(expected[0], rel=1e-5)


def test_rollout_metrics_are_computed_from_the_batch(tmp_path, model_dirs, text_jsonl, monkeypatch):
    """With many EOS ids some rows stop early: eos_rate, truncation_rate and gen_length equal the batch's."""
    rec = Recorder(monkeypatch, resample=False)
    eos = [2] + list(range(100, 160))
    result = potstill.distill(config(tmp_path, model_dirs, text_jsonl, "train.max_steps=4", "data.regime=onpolicy",
                                     "train.batch_size=6", f"onpolicy.eos_tokens={eos}", "data.max_length=12"),
                              progress=False)
    rows = train_rows(result.run_dir)
    rates = []
    for s, row in zip(rec.steps, rows):
        completions = [[t for _, t in labelled(s["out"][0], r)] for r in range(6)]
        ended = [c[-1] in eos for c in completions]
        rates.append(sum(ended) / 6)
        assert row["rollout/eos_rate"] == pytest.approx(sum(ended) / 6, rel=1e-12)
        assert row["rollout/truncation_rate"] == pytest.approx(sum(not e and len(c) == MAX_NEW for e, c in zip(ended, completions)) / 6, rel=1e-12)
        assert row["rollout/gen_length"] == pytest.approx(sum(map(len, completions)) / 6, rel=1e-12)
        assert all(t not in eos for c in completions for t in c[:-1])  # a row stops at its first EOS
    assert 0 < sum(rates) / len(rates) < 1  # the test saw both kinds of rows


def _draws(lam: float, n: int, seed: int = 0, rank: int = 0, world: int = 1) -> list[str]:
    cfg = RunConfig.from_yaml(None, ["teacher.path=x", "student.path=y", "data.regime=onpolicy", f"onpolicy.lam={lam}",
                                     f"train.seed={seed}"])
    regime = regimes.Regime(cfg, runtime.Runtime(torch.device("cpu"), rank, world), None, None, 0, 1,
                            lam_rng=random.Random(f"{seed}/{regimes.LAMBDA_STREAM}"))
    return [regime.draw_mode(step, 1) for step in range(n)]


def test_lambda_mixes_at_its_rate():
    """4000 steps at λ = 0.5 and 0.2: the on-policy fraction is within 4.5σ of λ (σ ≤ 0.008); ranks draw alike."""
    for lam in (0.5, 0.2):
        draws = _draws(lam, 4000)
        share = draws.count("fresh") / len(draws)
        assert abs(share - lam) < 4.5 * (lam * (1 - lam) / len(draws)) ** 0.5
    assert _draws(0.5, 200, rank=1, world=2) == _draws(0.5, 200)
    assert _draws(0.5, 200, seed=1) != _draws(0.5, 200)


def test_lambda_half_in_the_loop_trains_on_rollouts_exactly_on_drawn_steps(tmp_path, model_dirs, text_jsonl, monkeypatch):
    """Steps drawn on-policy train on the re-sampled tokens, the others on the data batch itself."""
    rec = Recorder(monkeypatch)
    result = potstill.distill(config(tmp_path, model_dirs, text_jsonl, "train.max_steps=10", "data.regime=onpolicy",
                                     "onpolicy.lam=0.5"), progress=False)
    modes = [s["mode"] for s in rec.steps]
    assert modes == _draws(0.5, 10) and {"fresh", "offline"} == set(modes)
    assert [r["rollout/on_policy"] for r in train_rows(result.run_dir)] == [float(m == "fresh") for m in modes]
    for s in rec.steps:
        batch, data = s["out"][0], s["data"][0]
        if s["mode"] == "offline":
            assert all(torch.equal(batch[k], data[k]) for k in data)
        else:
            prompts, again = s["again"][0]
            assert [[t for _, t in labelled(batch, r)] for r in range(3)] == again.tokens


@pytest.mark.parametrize("extra", [("onpolicy.lam=0.5",),
                                   ("onpolicy.lam=0.5", "onpolicy.replay=true", "onpolicy.replay_capacity=7",
                                    "onpolicy.replay_steps=2", "train.eval_every=1"),
                                   ("onpolicy.lam=1",)], ids=["lambda", "replay", "full"])
def test_resume_of_an_onpolicy_run_is_exact(tmp_path, model_dirs, text_jsonl, dropout_student, extra):
    """A dropout student, λ draws, rollouts (and the replay buffer and φ): the losses after resuming from step 4
    equal the uninterrupted run's bit for bit."""
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=8", "train.save_every=4", "train.keep_checkpoints=3",
                 "data.regime=onpolicy", *extra, student=str(dropout_student))
    full = potstill.distill(cfg, progress=False)
    before = train_rows(full.run_dir)
    simulate_crash(full.run_dir, 8, 6)
    again = train_rows(potstill.distill(cfg, resume=True, progress=False).run_dir)
    assert [r["step"] for r in again] == list(range(1, 9))
    keys = ["loss", "rollout/on_policy", "rollout/gen_length", "rollout/eos_rate", "rollout/replayed", "rollout/phi"]
    assert [[r.get(k) for k in keys] for r in again] == [[r.get(k) for k in keys] for r in before]
    if "onpolicy.replay=true" in extra:  # the run replayed the buffer after the resume point, and φ moved
        assert any(r["rollout/replayed"] == 1.0 for r in before[4:])


# ---- guards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["data.regime=online"], r"^data.regime='online': use offline or onpolicy$"),
    (["data.regime=onpolicy", "teacher.cache=/c"], r"^data.regime=onpolicy with teacher.cache: a cache cannot score"),
    (["data.regime=onpolicy", "data.packing=true"], r"^data.regime=onpolicy with data.packing"),
    (["data.regime=onpolicy", "parallel.strategy=fsdp"], r"^data.regime=onpolicy with parallel.strategy=fsdp"),
    (["data.regime=onpolicy", "onpolicy.lam=1.5"], r"^onpolicy.lam must be in \[0, 1\], got 1.5$"),
    (["data.regime=onpolicy", "onpolicy.max_new_tokens=0"], r"^onpolicy.max_new_tokens must be ≥ 1, got 0$"),
    (["data.regime=onpolicy", "onpolicy.top_p=0"], r"^onpolicy.top_p must be in \(0, 1\]"),
    (["data.regime=onpolicy", "onpolicy.replay=true", "onpolicy.replay_steps=0"], r"^onpolicy.replay_capacity and"),
    (["data.regime=onpolicy", "onpolicy.eos_tokens=[]"], r"^onpolicy.eos_tokens must be a non-empty list"),
    (["data.regime=onpolicy", "onpolicy.eos_tokens=[true]"], r"^onpolicy.eos_tokens must be a non-empty list"),
])
def test_settings_are_refused_at_load_in_one_line(extra, message):
    with pytest.raises(ValueError, match=message) as err:
        RunConfig.from_yaml(None, ["teacher.path=t", "student.path=s", *extra])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("data", ["text", "prompt_completion"])
def test_a_student_that_stops_at_another_token_than_the_data_is_refused(tmp_path, model_dirs, tokenizer, text_jsonl,
                                                                         pc_jsonl, data):
    """The student's generation EOS (id 7) is not what the completions end with (</s>): one line naming both;
    onpolicy.eos_tokens maps it explicitly."""
    text_jsonl = text_jsonl if data == "text" else pc_jsonl  # text: every document is cut at max_length
    student = save_tiny_model(tmp_path / "other_eos", "qwen2", tokenizer, seed=2, with_tokenizer=False)
    cfg_json = json.loads((student / "generation_config.json").read_text())
    (student / "generation_config.json").write_text(json.dumps({**cfg_json, "eos_token_id": [7]}))
    cfg = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=1", "data.regime=onpolicy", student=str(student))
    with pytest.raises(ValueError, match=r"completions end with token 2 \('</s>'\), but the student stops at 7 "
                                         r"\('.*'\) \(from the student's generation_config\).* onpolicy.eos_tokens: \[2\]") as err:
        potstill.distill(cfg, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
    mapped = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=1", "data.regime=onpolicy", "onpolicy.eos_tokens=['</s>']",
                    student=str(student))
    assert potstill.distill(mapped, progress=False).run_dir.exists()
    outside = config(tmp_path, model_dirs, text_jsonl, "train.max_steps=1", "data.regime=onpolicy",
                     f"onpolicy.eos_tokens=[{len(tokenizer) + 5}]", student=str(student), out="run2")
    with pytest.raises(ValueError, match=r"outside the shared vocabulary"):
        potstill.distill(outside, progress=False)


def test_ddp_two_ranks_roll_out_their_slices_like_one_process(tmp_path_factory, tokenizer):
    """torchrun, 2 gloo ranks × batch 2 vs one process × batch 4, greedy rollouts (a function of the prompt and the
    weights, so the rank split cannot change them): the same losses (rel 1e-5), generation lengths and EOS rates;
    with λ = 0.7 the ranks agree on every draw (one λ stream), and the checkpoint holds the regime's state."""
    from test_distributed import assert_same_trajectory, in_process, rows, torchrun
    from test_distributed import setup as dist_setup

    s = dist_setup.__wrapped__(tmp_path_factory, tokenizer)
    extra = ("data.regime=onpolicy", "onpolicy.temperature=0", "onpolicy.max_new_tokens=6", "onpolicy.prompt_tokens=3",
             "onpolicy.lam=0.7", "loss.objective=rkl", "train.save_every=2")
    one = in_process(s, s["root"] / "one", "train.batch_size=4", *extra)
    two = torchrun(s, s["root"] / "two", "train.batch_size=2", *extra)
    assert_same_trajectory(two, one)
    keys = ("rollout/on_policy", "rollout/gen_length", "rollout/eos_rate", "rollout/truncation_rate")
    assert [[r.get(k) for k in keys] for r in rows(two)] == [[r.get(k) for k in keys] for r in rows(one)]
    assert {r["rollout/on_policy"] for r in rows(one)} == {0.0, 1.0}
    state = torch.load(two / "checkpoints" / "step-0000002" / "potstill" / "trainer_state.pt", weights_only=False)
    assert state["onpolicy"]["lambda_rng"] is not None


def _chat_jsonl(path):
    from potstill.builtin import builtin_texts

    rows = []
    for text in builtin_texts("train", 30):
        words = text.split()
        rows.append({"messages": [{"role": "user", "content": " ".join(words[:4])},
                                  {"role": "assistant", "content": " ".join(words[4:9])}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_records_roll_out_the_first_assistant_turn(tmp_path, model_dirs, tokenizer, monkeypatch):
    """The prompt is the conversation up to the assistant header ("... assistant :"); only sampled tokens are
    labelled."""
    rec = Recorder(monkeypatch)
    data = _chat_jsonl(tmp_path / "chat.jsonl")
    potstill.distill(config(tmp_path, model_dirs, data, "train.max_steps=2", "data.regime=onpolicy"), progress=False)
    header = tokenizer("assistant :", add_special_tokens=False)["input_ids"]
    for s in rec.steps:
        prompts, again = s["again"][0]
        assert all(p[-len(header):] == header for p in prompts)
        assert [[t for _, t in labelled(s["out"][0], r)] for r in range(3)] == again.tokens


def test_a_chat_template_ending_turns_with_another_token_is_refused(tmp_path, model_dirs, text_jsonl):
    """A teacher whose chat template ends assistant turns with <unk>: the data's completions end with a token the
    student never stops at — one line naming both."""
    teacher = tmp_path / "teacher"
    shutil.copytree(model_dirs["llama_teacher"], teacher)
    template = (teacher / "chat_template.jinja").read_text().replace("{{ eos_token }}", "<unk>")
    (teacher / "chat_template.jinja").write_text(template)
    cfg = config(tmp_path, {**model_dirs, "llama_teacher": teacher}, _chat_jsonl(tmp_path / "chat.jsonl"),
                 "train.max_steps=1", "data.regime=onpolicy")
    with pytest.raises(ValueError, match=r"^data.regime=onpolicy: \d+ of the data's completions end with token 3 "
                                         r"\('<unk>'\), but the student stops at 2 \('</s>'\)") as err:
        potstill.distill(cfg, progress=False)
    assert "\n" not in str(err.value)


def test_replay_follows_distillms_adaptive_rule():
    """Fresh with probability φ(1 − t/T), replay up to φ (fresh while the buffer is short), else the data; φ grows by
    1/N_φ (capped at 1) only when the held-out CE rose; the buffer keeps the newest rows; draws are distinct rows."""
    from potstill.onpolicy.replay import Replay
    from potstill.onpolicy.rollouts import Rollout

    replay = Replay(capacity=5, steps=4, phi=0.5)
    replay.push(Rollout([0, 1, 2], [[1]] * 3, [[10], [11], [12]], [True, False, True], [[-1.0]] * 3))
    assert [replay.mode(u, 5, 10, 3) for u in (0.0, 0.249, 0.25, 0.499, 0.5, 0.9)] == \
        ["fresh", "fresh", "replay", "replay", "offline", "offline"]
    assert replay.mode(0.3, 5, 10, 4) == "fresh"  # 3 rows cannot fill a micro-batch of 4
    replay.push(Rollout([3, 4, 5], [[1]] * 3, [[13], [14], [15]], [False] * 3, [[-2.0]] * 3))
    assert [row[0] for row in replay.rows] == [1, 2, 3, 4, 5]
    drawn = replay.draw(4, seed=7)
    assert len(set(drawn.example_ids)) == 4 and set(drawn.example_ids) <= {1, 2, 3, 4, 5}
    assert drawn.example_ids == replay.draw(4, seed=7).example_ids
    phis = []
    for ce in (3.0, 2.9, 3.1, 3.2, 3.0, 3.5, 3.6):
        replay.after_eval(ce)
        phis.append(replay.phi)
    assert phis == [0.5, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_a_short_text_records_prompt_stops_before_its_eos():
    """BOS + prompt_tokens would swallow a 2-word text and its EOS: the prompt ends before the last token."""
    from potstill.onpolicy.rollouts import prompts_of

    batch = {"input_ids": torch.tensor([[1, 5, 6, 2, 0], [1, 5, 6, 7, 2]]),
             "labels": torch.tensor([[1, 5, 6, 2, -100], [1, 5, 6, 7, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}
    assert prompts_of(batch, bos_id=1, prompt_tokens=8) == [[1, 5, 6], [1, 5, 6, 7]]
    assert prompts_of(batch, bos_id=1, prompt_tokens=1) == [[1, 5], [1, 5]]


def test_rollouts_longer_than_the_students_positions_are_refused(tmp_path, model_dirs, text_jsonl):
    """Training examples of up to 24 tokens + 240 new tokens exceed the tiny student's 256 positions: refused before
    anything is written, naming both settings."""
    with pytest.raises(ValueError, match=r"rows may reach 264 tokens .* beyond the student's 256 positions; lower "
                                         r"data.max_length or onpolicy.max_new_tokens"):
        potstill.distill(config(tmp_path, model_dirs, text_jsonl, "data.regime=onpolicy", "onpolicy.max_new_tokens=240",
                                out="long"), progress=False)
    assert not (tmp_path / "long").exists()
