"""Multi-teacher KD in runs: live and cached teachers mixed into one target, routing by teacher_id, per-example
weights from the real teachers, DDK's held-out update, and every bad input refused before step 1 in one line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import potstill
from potstill.assemble import load_examples, load_parts
from potstill.builtin.arithmetic import extract_answer
from potstill.cache.format import CacheError
from potstill.cache.run import build_from_config
from potstill.config import RunConfig
from potstill.data.batches import collate, eval_batches
from potstill.guardrails import TokenizerMismatch
from potstill.models import HiddenAndHead
from potstill.multiteacher import weights as W
from potstill.sampling import SamplingSettings, sample
from potstill.task_eval import _prompt_length
from potstill.train import frozen_signal
from tests.conftest import save_tiny_model


def _cfg(tmp_path, model_dirs, data, *extra, out="run"):
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['qwen2_student']}",
                                      f"data.train={data}", "data.max_length=48", "data.max_eval_examples=8",
                                      "data.max_train_examples=40", "train.batch_size=4", "train.max_steps=4",
                                      "train.log_every=1", "train.eval_every=0", "train.lr=0.01", "eval.max_new_tokens=3",
                                      "cache.shard_size=16", f"out_dir={tmp_path / out}", *extra])


def _extra(**entry) -> str:
    return "teachers.extra=[" + json.dumps(entry) + "]"


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()


def _loaded(tmp_path, model_dirs, data, *extra):
    """A run's parts with the teachers bound to its examples, and a first batch of 4 training examples."""
    cfg = _cfg(tmp_path, model_dirs, data, *extra)
    parts = load_parts(cfg, torch.device("cpu"))
    train, held = load_examples(cfg, parts.tokenizer)
    parts.teachers.bind(train, held)
    return cfg, parts, train, held, collate(train[:4], parts.tokenizer.pad_token_id)


def _target(parts, batch, tau=1.0):
    first = lambda: frozen_signal(HiddenAndHead(parts.teacher, parts.vocab), batch)  # noqa: E731
    return parts.teachers.target(batch, tau, first, frozen_signal)


def test_two_live_teachers_train_and_log_their_weights(tmp_path, model_dirs, text_jsonl):
    cfg = _cfg(tmp_path, model_dirs, text_jsonl, _extra(name="b", path=str(model_dirs["gpt2_teacher"]), weight=3),
               "train.max_steps=8")
    result = potstill.distill(cfg, progress=False)
    losses = _losses(result.run_dir)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert result.metrics["teachers/weight/teacher"] == pytest.approx(0.25)
    assert result.metrics["teachers/weight/b"] == pytest.approx(0.75)


def test_a_live_and_a_cached_teacher_train_exactly_like_two_live_ones(tmp_path, model_dirs, text_jsonl):
    cache = tmp_path / "cache_b"
    b_cfg = RunConfig.from_yaml(None, [f"teacher.path={model_dirs['gpt2_teacher']}", f"teacher.cache={cache}",
                                       f"data.train={text_jsonl}", "data.max_length=48", "data.max_train_examples=40",
                                       "cache.mode=dense", "cache.shard_size=16", "loss.temperature=2"], check_run=False)
    build_from_config(b_cfg, progress=False)
    both = ("loss.temperature=2", "loss.objective=0.5*ce + gjsd(beta=0.5)")
    live = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, *both,
                                 _extra(name="b", path=str(model_dirs["gpt2_teacher"]), weight=2), out="live"), progress=False)
    cached = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, *both, _extra(name="b", cache=str(cache), weight=2),
                                   out="cached"), progress=False)
    assert _losses(cached.run_dir) == pytest.approx(_losses(live.run_dir), rel=1e-4)  # dense caches store fp32


def test_a_teacher_with_weight_zero_leaves_the_single_teacher_run(tmp_path, model_dirs, text_jsonl):
    single = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, out="single"), progress=False)
    mixed = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, _extra(name="b", path=str(model_dirs["gpt2_teacher"]), weight=0),
                                  out="mixed"), progress=False)
    assert _losses(mixed.run_dir) == pytest.approx(_losses(single.run_dir), rel=1e-5)


def _routed_jsonl(tmp_path, text_jsonl, names) -> str:
    path = tmp_path / "routed.jsonl"
    lines = [json.loads(line) for line in text_jsonl.read_text().splitlines()[:40]]
    path.write_text("".join(json.dumps({**r, "teacher_id": names[i % len(names)]}) + "\n" for i, r in enumerate(lines)))
    return str(path)


def test_route_puts_each_example_on_its_own_teacher(tmp_path, model_dirs, text_jsonl):
    data = _routed_jsonl(tmp_path, text_jsonl, ["teacher", "b", "b"])
    _, parts, train, _, batch = _loaded(tmp_path, model_dirs, data, "teachers.mix=route",
                                        _extra(name="b", path=str(model_dirs["gpt2_teacher"])))
    extra = parts.teachers.teachers[1].model
    mixture = _target(parts, batch)
    mixed = mixture.chunk_logits(slice(0, mixture.log_weights.shape[0])).view(4, -1, parts.vocab)
    for row, e in enumerate(train[:4]):
        model = parts.teacher if e.example_id % 3 == 0 else extra
        expected = F.log_softmax(_logits(model, batch)[row, : len(e.input_ids) - 1, : parts.vocab], -1)
        torch.testing.assert_close(mixed[row, : len(e.input_ids) - 1], expected, rtol=1e-5, atol=1e-5)


def test_routing_every_example_to_one_teacher_trains_like_that_teacher_alone(tmp_path, model_dirs, text_jsonl):
    data = _routed_jsonl(tmp_path, text_jsonl, ["b"])
    alone = _cfg(tmp_path, model_dirs, data, f"teacher.path={model_dirs['gpt2_teacher']}", out="alone")
    routed = _cfg(tmp_path, model_dirs, data, "teachers.mix=route", _extra(name="b", path=str(model_dirs["gpt2_teacher"])),
                  out="routed")
    assert _losses(potstill.distill(routed, progress=False).run_dir) == pytest.approx(
        _losses(potstill.distill(alone, progress=False).run_dir), rel=1e-5)


@pytest.mark.parametrize("record, message", [
    ({"text": "the cat"}, r"routed\.jsonl:3: no 'teacher_id' \(teachers\.mix=route needs one per record; teachers: teacher, b\)"),
    ({"text": "the cat", "teacher_id": "c"}, r"routed\.jsonl:3: teacher_id 'c' is not a configured teacher \(teachers: teacher, b\)"),
    ({"text": "the cat", "teacher_id": 1}, r"routed\.jsonl:3: teacher_id 1 is not a configured teacher"),
])
def test_route_refuses_a_missing_or_unknown_teacher_id_naming_the_line(tmp_path, model_dirs, record, message):
    path = tmp_path / "routed.jsonl"
    good = {"text": "the cat sleeps", "teacher_id": "b"}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, good, record, good, good]))
    cfg = _cfg(tmp_path, model_dirs, str(path), "teachers.mix=route", _extra(name="b", path=str(model_dirs["gpt2_teacher"])),
               "data.validation=" + str(path), "train.batch_size=2")
    with pytest.raises(ValueError, match=message):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_confidence_weights_come_from_each_teachers_label_likelihood(tmp_path, model_dirs, text_jsonl):
    _, parts, train, _, batch = _loaded(tmp_path, model_dirs, text_jsonl, "teachers.mix=confidence",
                                        _extra(name="b", path=str(model_dirs["gpt2_teacher"]), weight=3))
    tau = 2.0
    mixture = _target(parts, batch, tau)
    labels = batch["labels"][:, 1:]
    mean_logp = []
    for model in (parts.teacher, parts.teachers.teachers[1].model):
        logp = F.log_softmax(_logits(model, batch)[..., : parts.vocab] / tau, -1)
        per_token = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        mean_logp.append((per_token * (labels >= 0)).sum(1) / (labels >= 0).sum(1))
    expected = torch.softmax(torch.log(torch.tensor([0.25, 0.75])) + torch.stack(mean_logp, -1), -1)  # w0 · exp(c)
    width = labels.shape[1]
    for row in range(4):
        got = mixture.log_weights[row * width].exp()
        torch.testing.assert_close(got, expected[row], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected[0], torch.tensor([0.25, 0.75]))  # the likelihoods did move the weights


def test_correctness_uses_each_teachers_own_greedy_answer(tmp_path, model_dirs):
    _, parts, train, _, batch = _loaded(tmp_path, model_dirs, "builtin:arithmetic", "teachers.mix=correctness",
                                        _extra(name="b", path=str(model_dirs["gpt2_teacher"])))
    mixture = _target(parts, batch)
    models = (parts.teacher, parts.teachers.teachers[1].model)
    verdicts = []
    for e in train[:4]:
        prompt = e.input_ids[: _prompt_length(e)]
        settings = SamplingSettings(max_new_tokens=len(e.input_ids) - len(prompt) + 8, temperature=0.0)
        texts = [parts.tokenizer.decode(sample(m, [prompt], settings, eos_ids=parts.tokenizer.eos_token_id,
                                                  pad_id=parts.tokenizer.pad_token_id).tokens[0], skip_special_tokens=True)
                 for m in models]
        verdicts.append([extract_answer(t) == e.fields["answer"] for t in texts])
    assert [parts.teachers.correct[e.example_id].tolist() for e in train[:4]] == verdicts
    expected = W.correctness_weights(torch.tensor([1.0, 1.0]), torch.tensor(verdicts), torch.ones(4, dtype=torch.bool))
    width = batch["input_ids"].shape[1] - 1
    torch.testing.assert_close(mixture.log_weights[::width].exp(), expected)


def test_ddk_factors_follow_the_held_out_ce_ratio_per_domain(tmp_path, model_dirs):
    cfg, parts, train, held, _ = _loaded(tmp_path, model_dirs, "builtin:mixed", "teachers.mix=ddk", "teachers.ddk_smoothing=0.5",
                                         _extra(name="b", path=str(model_dirs["gpt2_teacher"])))
    mt = parts.teachers
    assert mt.domains == ["prompt/completion", "text"]
    batches = eval_batches(held, 4, parts.tokenizer.pad_token_id)
    metrics = mt.after_eval(parts.student, batches)

    def ce(model, domain):
        total = count = 0.0
        for batch in batches:
            logp = F.log_softmax(_logits(model, batch)[..., : parts.vocab], -1)
            labels = batch["labels"][:, 1:]
            for row, example_id in enumerate(batch["example_id"].tolist()):
                if (example_id % 2 == 0) == (domain == "prompt/completion"):  # builtin:mixed: even = arithmetic
                    keep = labels[row] >= 0
                    total -= logp[row][keep].gather(-1, labels[row][keep][:, None]).sum().item()
                    count += keep.sum().item()
        return total / count

    models = {"student": parts.student, "teacher": parts.teacher, "b": mt.teachers[1].model}
    for d, domain in enumerate(mt.domains):
        got = {name: metrics[f"teachers/ce/{domain}/{name}"] for name in models}
        assert got == pytest.approx({name: ce(m, domain) for name, m in models.items()}, rel=1e-5)
        ratios = torch.tensor([got["student"] / got["teacher"], got["student"] / got["b"]])
        expected = 0.5 * torch.softmax(torch.log(torch.tensor([0.5, 0.5])) + ratios, -1) + 0.25
        assert [metrics[f"teachers/ddk/{domain}/{n}"] for n in ("teacher", "b")] == pytest.approx(expected.tolist(), rel=1e-5)
    state = mt.state_dict()
    mt.factors = torch.full_like(mt.factors, 0.5)
    mt.load_state_dict(state)
    assert mt.factors.tolist() == state["factors"]


def test_ddk_run_resumes_its_factors(tmp_path, model_dirs):
    """The factors updated at the step-2 evaluation come back with the step-2 checkpoint: without them the resumed
    steps would mix with the initial factors and give other losses."""
    import shutil

    cfg = _cfg(tmp_path, model_dirs, "builtin:mixed", "teachers.mix=ddk", _extra(name="b", path=str(model_dirs["gpt2_teacher"])),
               "train.eval_every=2", "train.save_every=2", "train.keep_checkpoints=3")
    full = potstill.distill(cfg, progress=False)
    uninterrupted = _losses(full.run_dir)
    shutil.rmtree(full.run_dir / "checkpoints" / "step-0000004")
    shutil.rmtree(full.run_dir / "final")
    lines = (full.run_dir / "metrics.jsonl").read_text().splitlines()
    (full.run_dir / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 2) + "\n")
    resumed = potstill.distill(cfg, resume=True, progress=False)
    assert _losses(resumed.run_dir) == uninterrupted  # bit-identical


BAD_CONFIGS = [
    (["teachers.extra=oops"], "config key 'teachers.extra' expects list or NoneType, got 'oops'"),
    (["teachers.extra=[]"], "teachers.extra must be a non-empty list"),
    (["teachers.extra=[3]"], r"teachers.extra\[0\] must be a mapping"),
    (['teachers.extra=[{"name": "b", "path": "x", "wieght": 2}]'], r"teachers.extra\[0\]: unknown key\(s\) wieght"),
    (['teachers.extra=[{"path": "x"}]'], r"teachers.extra\[0\] needs a non-empty string 'name'"),
    (['teachers.extra=[{"name": "b", "path": "x", "cache": "y"}]'], r"teachers.extra\[0\] \('b'\): set exactly one of 'path'"),
    (['teachers.extra=[{"name": "b"}]'], r"teachers.extra\[0\] \('b'\): set exactly one of 'path'"),
    (['teachers.extra=[{"name": "b", "path": "x", "weight": -1}]'], r"\('b'\): weight must be a finite number ≥ 0, got -1"),
    (['teachers.extra=[{"name": "b", "path": "x", "weight": "heavy"}]'], "weight must be a finite number"),
    (['teachers.extra=[{"name": "teacher", "path": "x"}]'], "name 'teacher' is used twice"),
    (['teachers.extra=[{"name": "b", "path": "x", "weight": 0}]', "teachers.weight=0"], "every weight is 0"),
    (["teachers.mix=vote"], "teachers.mix='vote': use fixed, confidence, correctness, ddk, route"),
    (["teachers.mix=route"], "teachers.mix=route mixes several teachers: list the others in teachers.extra"),
    (["teachers.ddk_smoothing=0"], r"teachers.ddk_smoothing must be in \(0, 1\]"),
    (["teachers.weight=-2"], "teachers.weight must be a finite number ≥ 0"),
    (['teachers.extra=[{"name": "b", "cache": "c"}]', "teachers.mix=ddk"],
     r"teachers.mix=ddk runs every teacher .* 'b' \(teachers.extra\[0\]\) is a cache"),
    (['teachers.extra=[{"name": "b", "path": "x"}]', "teacher.path=", "teacher.cache=c", "teachers.mix=correctness"],
     r"'teacher' \(teacher.cache\) is a cache"),
    (['teachers.extra=[{"name": "b", "path": "x"}]', "teacher.path=", "teacher.self_distill=frozen"],
     "teachers.extra adds teachers to teacher.path or teacher.cache"),
    (['teachers.extra=[{"name": "b", "path": "x"}]', "loss.objective=ce"], "uses no teacher"),
    (['teachers.extra=[{"name": "b", "path": "x"}]', "loss.temperature_schedule=dts(t_min=1, t_max=3)"],
     "use a fixed loss.temperature with several teachers"),
    (['teachers.extra=[{"name": "b", "path": "x"}]', "loss.select=entropy(keep=0.5)", "loss.temperature=2"],
     "token statistics read the mixture at T = 1"),
]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS)
def test_bad_teachers_settings_are_refused_at_load(tmp_path, model_dirs, overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path, model_dirs, "builtin", *overrides)


def test_each_teachers_guardrails_name_it(tmp_path, model_dirs, tokenizer, text_jsonl):
    retokenizing = save_tiny_model(tmp_path / "q", "qwen2", tokenizer, with_tokenizer=True)  # same vocab, other ids
    with pytest.raises(TokenizerMismatch, match=r"teachers.extra\[0\] \(teacher 'b'\): its tokenizer differs from "
                                                r"teacher 'teacher''s.*tokenize .* differently"):
        potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, _extra(name="b", path=str(retokenizing))), progress=False)
    narrow = save_tiny_model(tmp_path / "narrow", "llama", tokenizer, vocab=len(tokenizer) - 3)
    with pytest.raises(ValueError, match=rf"teachers.extra\[0\] \(teacher 'b'\): its output layer has {len(tokenizer) - 3} "
                                         rf"rows but the tokenizer has {len(tokenizer)} tokens"):
        potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, _extra(name="b", path=str(narrow))), progress=False)
    assert not (tmp_path / "run").exists()


def test_top_k_and_incomplete_caches_are_refused_naming_the_teacher(tmp_path, model_dirs, text_jsonl):
    topk = tmp_path / "topk"
    build_from_config(RunConfig.from_yaml(None, [f"teacher.path={model_dirs['gpt2_teacher']}", f"teacher.cache={topk}",
                                                 f"data.train={text_jsonl}", "data.max_length=48", "data.max_train_examples=40",
                                                 "cache.mode=topk", "cache.k=4"], check_run=False), progress=False)
    with pytest.raises(CacheError, match=r"teachers.extra\[0\] \(teacher 'b'\): a topk cache cannot be mixed exactly"):
        potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, _extra(name="b", cache=str(topk))), progress=False)
    first_topk = _cfg(tmp_path, model_dirs, text_jsonl, "teacher.path=", f"teacher.cache={topk}",
                      _extra(name="b", path=str(model_dirs["gpt2_teacher"])))
    with pytest.raises(CacheError, match=r"teacher.cache \(teacher 'teacher'\): a topk cache cannot be mixed exactly"):
        potstill.distill(first_topk, progress=False)
    small = tmp_path / "small"
    build_from_config(RunConfig.from_yaml(None, [f"teacher.path={model_dirs['gpt2_teacher']}", f"teacher.cache={small}",
                                                 f"data.train={text_jsonl}", "data.max_length=48", "data.max_train_examples=10",
                                                 "cache.mode=dense"], check_run=False), progress=False)
    with pytest.raises(CacheError, match=r"teachers.extra\[0\] \(teacher 'b'\): training example \d+ is not in the cache"):
        potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, _extra(name="b", cache=str(small))), progress=False)
    assert not (tmp_path / "run").exists()


def test_packed_batches_give_each_document_its_own_weights(tmp_path, model_dirs, tokenizer, text_jsonl):
    """Per-example weights follow the segment table: a packed run trains like the padded one."""
    other = save_tiny_model(tmp_path / "llama_b", "llama", tokenizer, layers=2, hidden=32, seed=7)
    extra = ("teachers.mix=confidence", _extra(name="b", path=str(other)), "data.max_length=128")
    padded = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, *extra, out="padded"), progress=False)
    packed = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, *extra, "data.packing=true", out="packed"), progress=False)
    assert _losses(packed.run_dir) == pytest.approx(_losses(padded.run_dir), rel=1e-5)
    padding = lambda run: [r["padding"] for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                           if r["kind"] == "train"]
    assert sum(padding(packed)) < sum(padding(padded))  # documents did share rows
