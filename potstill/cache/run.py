"""`potstill cache` (build a teacher-signal cache from a run config) and opening one for `potstill distill`.

The cache directory also holds the teacher's tokenizer (``tokenizer/``), so a cached run needs no teacher files.
Checks at open, before step 1: the run's tokenizer is the one the cache was built with (fingerprint); every
training example is in the cache with the same length; the cache's temperature is the run's; the objective only
needs what the cache mode provides (sampled caches: forward-KL/CE-type terms; token selection and temperature
schedules: a dense or top-k cache at T = 1).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from potstill import models, runtime
from potstill.config import RunConfig
from potstill.data.encode import Example
from potstill.cache.store import (CacheReader, build_cache, fingerprint_examples, fingerprint_model,
                                    fingerprint_tokenizer)
from potstill.cache.format import CacheError, CacheSpec, example_digest

TOKENIZER_DIR = "tokenizer"


def cache_spec(cfg: RunConfig, vocab: int) -> CacheSpec:
    c = cfg.cache
    return CacheSpec(mode=c.mode, vocab=vocab, k=c.k, samples=c.samples, temperature=cfg.loss.temperature,
                     proposal_temperature=c.proposal_temperature, seed=c.seed, shard_size=c.shard_size)


def _save_tokenizer(tokenizer, out: Path) -> None:
    target = out / TOKENIZER_DIR
    if target.exists():
        return
    tmp = out / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


def build_from_config(cfg: RunConfig, progress: bool = True) -> dict:
    """Run the teacher over the run's training examples and store its signal in ``teacher.cache``."""
    from potstill.assemble import load_examples, load_tokenizer, resolve_model_path

    if not cfg.teacher.path or not cfg.teacher.cache:
        raise ValueError("potstill cache needs teacher.path (the model to run) and teacher.cache (where to write)")
    rt = runtime.setup(cfg.device, multi_process=True)
    teacher_path = resolve_model_path(cfg.teacher.path)
    teacher = models.load_causal_lm(teacher_path, cfg.teacher.dtype).to(rt.device).eval().requires_grad_(False)
    tokenizer = load_tokenizer(teacher_path)
    vocab = len(tokenizer)
    examples, _ = load_examples(cfg, tokenizer)
    spec = cache_spec(cfg, vocab)
    fingerprints = {"teacher": fingerprint_model(teacher), "tokenizer": fingerprint_tokenizer(tokenizer),
                    "data": fingerprint_examples(examples)}
    out = Path(cfg.teacher.cache)
    out.mkdir(parents=True, exist_ok=True)
    if rt.is_main:
        _save_tokenizer(tokenizer, out)
    started = time.perf_counter()
    build_cache(out, teacher, examples, spec, fingerprints=fingerprints, batch_size=cfg.cache.batch_size,
                rank=rt.rank, world_size=rt.world_size, progress=progress and rt.is_main)
    seconds = time.perf_counter() - started
    positions = sum(len(e.input_ids) - 1 for e in examples)
    summary = {"dir": str(out), "mode": spec.mode, "examples": len(examples), "positions": positions,
               "seconds": seconds, "positions_per_s": positions / max(seconds, 1e-9)}
    if (out / "manifest.json").exists():
        summary["bytes_per_position"] = CacheReader(out, verify=False).bytes_per_position()
    return summary


def cached_tokenizer(cache_dir: str):
    from potstill.assemble import load_tokenizer

    path = Path(cache_dir) / TOKENIZER_DIR
    if not path.exists():
        raise CacheError(f"{cache_dir} has no {TOKENIZER_DIR}/: is it a cache written by `potstill cache`?")
    return load_tokenizer(str(path))


def open_cache(cfg: RunConfig, tokenizer, vocab: int) -> CacheReader:
    reader = CacheReader(cfg.teacher.cache, expect={"tokenizer": fingerprint_tokenizer(tokenizer)})
    spec = reader.spec
    if spec.vocab != vocab:
        raise CacheError(f"the cache covers {spec.vocab} vocabulary rows, this student {vocab}")
    if abs(spec.temperature - cfg.loss.temperature) > 1e-6:
        raise CacheError(f"the cache was built at temperature {spec.temperature:g} but loss.temperature is "
                         f"{cfg.loss.temperature:g}: set loss.temperature={spec.temperature:g} or rebuild the cache")
    objective = cfg.objective()
    if spec.mode == "sample":
        objective.check_sparse_support(f"a sampled cache ({cfg.teacher.cache})")
    needs_full_t1 = objective.selection is not None or objective.tracks_nll
    if needs_full_t1 and (spec.mode == "sample" or spec.temperature != 1.0):
        raise CacheError("token selection and temperature schedules need the teacher's full distribution at T = 1: "
                         "use a live teacher, or a dense/topk cache built with loss.temperature=1")
    return reader


def check_examples_cached(reader: CacheReader, examples: list[Example]) -> None:
    """Every training example must be in the cache with the very token ids it had at build time (a training
    subset of the cached data is fine, and ids need not be contiguous: lookups are by example id). Then every shard
    holding one is opened and checked (size, sha256, NaN/inf), so a damaged cache stops the run before step 1."""
    for e in examples:
        if not reader.has(e.example_id):
            raise CacheError(f"training example {e.example_id} is not in the cache ({len(reader.example_ids)} "
                             "examples): the data changed since the cache was built; rebuild it with `potstill cache`")
        if reader.length(e.example_id) != len(e.input_ids):
            raise CacheError(f"training example {e.example_id} has {len(e.input_ids)} tokens here but "
                             f"{reader.length(e.example_id)} in the cache: rebuild it for this data and data.max_length")
        if reader.digest(e.example_id) != example_digest(e.input_ids):
            raise CacheError(f"training example {e.example_id} has other tokens than when the cache was built "
                             "(the data changed): rebuild the cache with `potstill cache`")
    reader.check_shards(e.example_id for e in examples)
