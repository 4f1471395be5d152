"""Training from a teacher-signal cache: the same loss path, looked up by example id, with its guardrails."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import potstill
from potstill.cli import app
from potstill.config import RunConfig
from potstill.cache.format import CacheError
from potstill.cache.run import build_from_config

runner = CliRunner()


def _cfg(tmp_path, model_dirs, data, *extra):
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['qwen2_student']}",
                                      f"data.train={data}", "data.max_length=48", "data.max_eval_examples=8",
                                      "data.max_train_examples=40", "train.batch_size=4", "train.max_steps=6",
                                      "train.log_every=1", "train.eval_every=0", "train.lr=0.01", "eval.max_new_tokens=3",
                                      "cache.shard_size=16", *extra])


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_dense_cache_training_equals_live_teacher(tmp_path, model_dirs, text_jsonl):
    cache = tmp_path / "cache"
    summary = build_from_config(_cfg(tmp_path, model_dirs, text_jsonl, f"teacher.cache={cache}", "cache.mode=dense"), progress=False)
    assert summary["examples"] == 40 and (cache / "manifest.json").exists() and (cache / "tokenizer" / "tokenizer.json").exists()  # all 40 records: none carved off
    live = potstill.distill(_cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / 'live'}"), progress=False)
    cached_cfg = _cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / 'cached'}", f"teacher.cache={cache}", "teacher.path=")
    cached = potstill.distill(cached_cfg, progress=False)
    assert _losses(cached.run_dir) == pytest.approx(_losses(live.run_dir), rel=1e-4)  # dense caches store fp32
    assert "teacher_ce" not in cached.metrics  # the teacher was never loaded


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_sparse_caches_train_and_refuse_what_they_cannot_do(tmp_path, model_dirs, text_jsonl, mode):
    cache = tmp_path / "cache"
    build_from_config(_cfg(tmp_path, model_dirs, text_jsonl, f"teacher.cache={cache}", f"cache.mode={mode}",
                           "cache.k=8", "cache.samples=16"), progress=False)
    run = _cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / 'run'}", f"teacher.cache={cache}", "teacher.path=",
               "train.max_steps=12")
    losses = _losses(potstill.distill(run, progress=False).run_dir)
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # sampled losses are noisy estimates: compare averages
    if mode == "sample":
        bad = _cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / 'rkl'}", f"teacher.cache={cache}",
                   "teacher.path=", "loss.objective=rkl")
        with pytest.raises(ValueError, match="rkl need the full teacher distribution: build the cache in mode 'topk' or 'dense'"):
            potstill.distill(bad, progress=False)
    hot = _cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / 'hot'}", f"teacher.cache={cache}", "teacher.path=",
               "loss.temperature=2")
    with pytest.raises(CacheError, match="built at temperature 1 but loss.temperature is 2"):
        potstill.distill(hot, progress=False)


def _topk_cache(tmp_path, model_dirs, data):
    cache = tmp_path / "cache"
    build_from_config(_cfg(tmp_path, model_dirs, data, f"teacher.cache={cache}", "cache.mode=topk", "cache.k=4"), progress=False)
    return cache


def _cached_run(tmp_path, model_dirs, data, cache, *extra):
    return _cfg(tmp_path, model_dirs, data, f"out_dir={tmp_path / 'r'}", f"teacher.cache={cache}", "teacher.path=", *extra)


def test_cache_refuses_same_length_different_text(tmp_path, model_dirs, text_jsonl):
    cache = _topk_cache(tmp_path, model_dirs, text_jsonl)
    lines = text_jsonl.read_text().splitlines()
    record = json.loads(lines[0])
    words = record["text"].split()
    record["text"] = " ".join([words[1], words[0], *words[2:]])  # same words, same length, other order
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(CacheError, match="has other tokens than when the cache was built"):
        potstill.distill(_cached_run(tmp_path, model_dirs, edited, cache), progress=False)


def test_cache_refuses_changed_data(tmp_path, model_dirs, text_jsonl):
    cache = _topk_cache(tmp_path, model_dirs, text_jsonl)
    longer = _cached_run(tmp_path, model_dirs, text_jsonl, cache, "data.max_length=64")
    with pytest.raises(CacheError, match=r"has \d+ tokens here but 48 in the cache: rebuild it for this data"):
        potstill.distill(longer, progress=False)


def test_cache_cli_then_distill_cli(tmp_path, model_dirs, text_jsonl):
    cache = tmp_path / "c"
    built = runner.invoke(app, ["cache", "--teacher", str(model_dirs["llama_teacher"]), "--data", str(text_jsonl),
                                "--out", str(cache), "--mode", "sample", "cache.samples=8", "data.max_length=32",
                                "data.max_train_examples=12"], terminal_width=200)
    assert built.exit_code == 0, built.output
    assert "bytes_per_position" in built.output
    again = runner.invoke(app, ["cache", "--teacher", str(model_dirs["llama_teacher"]), "--data", str(text_jsonl),
                                "--out", str(cache), "--mode", "topk", "data.max_length=32", "data.max_train_examples=12"])
    assert again.exit_code == 2 and "error" in again.output  # a different build into the same directory is refused
    trained = runner.invoke(app, ["distill", "--cache", str(cache), "--student", str(model_dirs["qwen2_student"]),
                                  "--data", str(text_jsonl), "--steps", "2", "--out", str(tmp_path / "run"),
                                  "data.max_length=32", "data.max_train_examples=12", "data.max_eval_examples=4",
                                  "eval.max_new_tokens=2"])
    assert trained.exit_code == 0, trained.output


def test_student_from_teacher_layers_with_signals_from_the_cache(tmp_path, model_dirs, text_jsonl):
    """`distill --cache DIR --teacher T --init-layers N`: the student is T's first N layers, the signal the cache's."""
    import torch

    from potstill.assemble import load_parts
    from potstill.models import load_causal_lm

    cache = _topk_cache(tmp_path, model_dirs, text_jsonl)
    teacher_dir = str(model_dirs["llama_teacher"])
    cfg = _cached_run(tmp_path, model_dirs, text_jsonl, cache, f"teacher.path={teacher_dir}", "student.path=",
                      "student.init_from_teacher_layers=2")
    parts = load_parts(cfg, torch.device("cpu"))
    assert parts.teacher is None and parts.cache is not None  # the cache is the signal
    teacher = load_causal_lm(teacher_dir, "float32").state_dict()
    student = parts.student.state_dict()
    assert parts.student.config.num_hidden_layers == 2 and "model.layers.2.mlp.up_proj.weight" in teacher
    assert all(torch.equal(t, teacher[name]) for name, t in student.items())
    trained = runner.invoke(app, ["distill", "--cache", str(cache), "--teacher", teacher_dir, "--init-layers", "2",
                                  "--data", str(text_jsonl), "--steps", "3", "--out", str(tmp_path / "run"),
                                  "data.max_length=48", "data.max_train_examples=40", "data.max_eval_examples=4",
                                  "eval.max_new_tokens=2", "train.log_every=1", "train.batch_size=4"])
    assert trained.exit_code == 0, trained.output
    losses = _losses(tmp_path / "run")
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite training from cached signals
    final = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert final["num_hidden_layers"] == 2


@pytest.mark.parametrize("damage, message", [("garble", "is corrupted"), ("delete", "is missing")])
def test_a_damaged_shard_stops_the_run_before_step_one(tmp_path, model_dirs, text_jsonl, damage, message):
    cache = _topk_cache(tmp_path, model_dirs, text_jsonl)
    shard = cache / "shard-00002.safetensors"  # the last shard: the first batches would not touch it
    if damage == "garble":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    result = runner.invoke(app, ["distill", "--cache", str(cache), "--student", str(model_dirs["qwen2_student"]),
                                 "--data", str(text_jsonl), "--steps", "2", "--out", str(tmp_path / "run"),
                                 "data.max_length=48", "data.max_train_examples=40"], terminal_width=400)
    assert result.exit_code == 2
    error = [line for line in result.output.splitlines() if not line.startswith("data: ")]  # after the data counts
    assert len(error) == 1 and error[0].startswith("error: shard ")  # one line
    assert f"shard-00002.safetensors {message}" in error[0] and "`potstill cache`" in error[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_a_sampled_cache_for_an_objective_it_cannot_serve_is_refused_before_building(tmp_path, model_dirs, text_jsonl):
    cache = tmp_path / "cache"
    cfg = _cfg(tmp_path, model_dirs, text_jsonl, f"teacher.cache={cache}", "cache.mode=sample",
               "loss.objective=0.5*ce + 0.5*rkl")
    with pytest.raises(ValueError, match=r"cache.mode=sample only supports .*rkl need the full teacher distribution: "
                                         r"build the cache in mode 'topk' or 'dense'"):
        build_from_config(cfg, progress=False)
    assert not cache.exists()  # refused before the teacher ran or anything was written


def test_one_cache_serves_runs_with_and_without_a_validation_file(tmp_path, model_dirs, text_jsonl):
    """The issue's scenario: `potstill cache --data train.jsonl` then `distill --cache DIR --data train.jsonl
    --validation val.jsonl` used to disagree on which record was which. Ids are file positions and the cache holds
    every training record, so both a run that carves its validation off the file and one given a file work."""
    cache = tmp_path / "cache"
    build_from_config(_cfg(tmp_path, model_dirs, text_jsonl, f"teacher.cache={cache}", "cache.mode=topk",
                           "cache.k=4", "data.max_train_examples=120"), progress=False)
    validation = tmp_path / "val.jsonl"
    validation.write_text("".join(text_jsonl.read_text().splitlines(keepends=True)[200:210]))
    for name, extra in (("with-val", [f"data.validation={validation}"]), ("carved", [])):
        run = _cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / name}", f"teacher.cache={cache}", "teacher.path=",
                   "loss.objective=fkl", "train.max_steps=3", "data.max_train_examples=120", *extra)
        potstill.distill(run, progress=False)
        losses = _losses(tmp_path / name)
        assert len(losses) == 3 and all(loss == loss for loss in losses)
