"""Cross-tokenizer runs end to end on the built-in default (the word-level shipped teacher, a student with the
built-in BPE tokenizer): bits per byte for both models over the same bytes, and a cached run that trains exactly as
the live one."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from potstill.config import RunConfig
from potstill.models import load_causal_lm, load_tokenizer, resolve_model_path

OBJECTIVE = "0.5*ce + uld + alm + gold"


def config(out, **sections) -> RunConfig:
    data = {"teacher": {"path": "builtin"},
            "student": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "max_position_embeddings": 256},
                        "tokenizer": "builtin:bpe"},
            # 256 tokens: no built-in document is cut on either side, so both models score the same bytes
            "data": {"train": "builtin", "max_length": 256, "max_train_examples": 16, "max_eval_examples": 4},
            "loss": {"objective": OBJECTIVE},
            "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "save_every": 0, "lr": 1e-3, "log_every": 1,
                      "report_to": "none"},
            "eval": {"max_new_tokens": 4},
            "out_dir": str(out)}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return RunConfig.from_dict(data)


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    from potstill import distill

    return distill(config(tmp_path_factory.mktemp("live") / "run"), progress=False).run_dir


def naive_teacher_bpb(cfg: RunConfig) -> tuple[float, int]:
    """From the definition: the teacher's own tokens of each held-out text (+ EOS), Σ −ln p(next) over them all,
    over the texts' UTF-8 bytes, in bits."""
    from potstill.builtin.grammar import builtin_texts

    path = resolve_model_path("builtin")
    teacher, tok = load_causal_lm(path).eval(), load_tokenizer(path)
    nll, n_bytes = 0.0, 0
    for text in builtin_texts("validation", cfg.data.max_eval_examples):
        ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            logp = F.log_softmax(teacher(ids).logits[0, :-1, : len(tok)].double(), -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        n_bytes += len(text.encode())
    return nll / n_bytes / math.log(2), n_bytes


def test_a_cross_tokenizer_run_logs_both_models_bits_per_byte_over_the_same_bytes(live_run):
    final = rows(live_run, "eval")[-1]
    expected, n_bytes = naive_teacher_bpb(config(live_run))
    assert final["bytes"] == final["teacher_bytes"] == n_bytes
    assert final["teacher_bpb"] == pytest.approx(expected, rel=1e-5)
    assert final["tokens"] > final["teacher_tokens"]  # BPE spends more tokens on the same text
    assert final["bpb"] == pytest.approx(final["student_ce"] * final["tokens"] / n_bytes / math.log(2), rel=1e-6)
    assert final["bpb"] > final["teacher_bpb"]  # a 3-step student


def test_potstill_eval_and_the_report_show_bits_per_byte(live_run):
    from potstill.evaluate_run import evaluate_path
    from potstill.report import write_report

    metrics = evaluate_path(live_run)
    last = rows(live_run, "eval")[-1]
    assert metrics["bpb"] == pytest.approx(last["bpb"], rel=1e-6)
    assert metrics["teacher_bpb"] == pytest.approx(last["teacher_bpb"], rel=1e-6)
    report = write_report(live_run).read_text()
    assert "| bits per byte (held-out text) |" in report
    from potstill.report import compare_runs
    assert "bpb" in compare_runs([live_run]).splitlines()[0]


def test_a_cached_run_trains_exactly_as_the_live_run(live_run, tmp_path):
    """`potstill cache` with the teacher's tokenizer (dense, cross-tokenizer fields), then the same run reading it:
    the same loss and term values at every step, so the same student."""
    from potstill import distill
    from potstill.cache.run import build_from_config

    cache = tmp_path / "cache"
    build_from_config(config(tmp_path / "unused", teacher={"cache": str(cache)}, cache={"mode": "dense"}), progress=False)
    cached_run = distill(config(tmp_path / "cached", teacher={"cache": str(cache)}), progress=False).run_dir
    live, cached = rows(live_run, "train"), rows(cached_run, "train")
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached):
        for key in ("loss", "term/ce", "term/uld", "term/alm", "term/gold"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_a_cache_without_cross_tokenizer_fields_stops_the_run_before_step_1(tmp_path):
    from potstill import distill
    from potstill.cache.format import CacheError
    from potstill.cache.run import build_from_config

    cache = tmp_path / "cache"
    build_from_config(config(tmp_path / "unused", teacher={"cache": str(cache)}, loss={"objective": "ce"},
                             cache={"mode": "dense"}), progress=False)
    with pytest.raises(CacheError, match="has no cross-tokenizer fields .*rebuild it with `potstill cache`"):
        distill(config(tmp_path / "run", teacher={"cache": str(cache)}), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_cache_whose_tokenizer_is_not_the_one_it_was_built_with_is_refused(tmp_path):
    """The run aligns with the cache's saved tokenizer, so that tokenizer must be the one the cache was built with
    (manifest fingerprint): one with an extra token in its place is refused before anything is written."""
    from potstill import distill
    from potstill.cache.format import CacheError
    from potstill.cache.run import build_from_config

    cache = tmp_path / "cache"
    build_from_config(config(tmp_path / "unused", teacher={"cache": str(cache)}, cache={"mode": "dense"}), progress=False)
    changed = load_tokenizer(str(cache / "tokenizer"))
    changed.add_tokens(["zebra"])
    changed.save_pretrained(cache / "tokenizer")
    with pytest.raises(CacheError, match=r"cache was built with tokenizer fingerprint \w+, this run has \w+: rebuild"):
        distill(config(tmp_path / "run", teacher={"cache": str(cache)}), progress=False)
    assert not (tmp_path / "run").exists()
