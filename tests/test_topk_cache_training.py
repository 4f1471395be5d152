"""A real top-k cache (built with potstill.cache.run.build_from_config) trains every teacher objective that the
old even-tail target turned into NaN at step 1: rkl and akl read log p on the tail, where a stored tail of 0 (fp16
rounding) and the padded positions of a batch used to give 0·∞ in the backward pass."""
from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

import potstill
from potstill.cache.run import build_from_config
from tests.test_cache_training import _cfg, _losses


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, model_dirs, text_jsonl):
    cache = tmp_path_factory.mktemp("topk") / "cache"
    build_from_config(_cfg(cache.parent, model_dirs, text_jsonl, f"teacher.cache={cache}", "cache.mode=topk", "cache.k=4"),
                      progress=False)
    return cache


@pytest.mark.parametrize("objective", ["rkl", "akl"])
def test_rkl_and_akl_train_from_a_topk_cache(tmp_path, model_dirs, text_jsonl, topk_cache, objective):
    run = _cfg(tmp_path, model_dirs, text_jsonl, f"out_dir={tmp_path / 'run'}", f"teacher.cache={topk_cache}",
               "teacher.path=", f"loss.objective={objective}", "train.max_steps=3")
    result = potstill.distill(run, progress=False)
    losses = _losses(result.run_dir)
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    weights = load_file(str(next(result.final_dir.glob("*.safetensors"))))
    assert all(t.isfinite().all() for t in weights.values())
