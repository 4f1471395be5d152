"""`potstill cache`: build a teacher-signal cache from a run config (``opening.py`` opens one for `distill`).

The cache directory also holds the teacher's tokenizer (``tokenizer/``), so a cached run needs no teacher files.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from potstill import models, runtime
from potstill.assemble import load_cacheable_examples
from potstill.cache.opening import TOKENIZER_DIR
from potstill.config import RunConfig
from potstill.cache.reader import CacheReader
from potstill.cache.store import build_cache, fingerprint_examples, fingerprint_model, fingerprint_tokenizer
from potstill.cache.format import CacheSpec
from potstill.precision import resolve_model_dtype


def cache_spec(cfg: RunConfig, vocab: int) -> CacheSpec:
    """The spec of the cache ``cfg`` builds; an objective with a cross-tokenizer term (uld, alm, gold, xproj) also stores
    the cross-tokenizer fields, so the cache serves a student with another tokenizer (cache/crosstok.py)."""
    c = cfg.cache
    return CacheSpec(mode=c.mode, vocab=vocab, k=c.k, samples=c.samples, temperature=cfg.loss.temperature,
                     proposal_temperature=c.proposal_temperature, seed=c.seed, shard_size=c.shard_size,
                     cross_tokenizer=bool(cfg.objective().crosstok_terms))


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
    if not cfg.teacher.path or not cfg.teacher.cache:
        raise ValueError("potstill cache needs teacher.path (the model to run) and teacher.cache (where to write)")
    if cfg.cache.mode == "sample":  # refuse now, not after an hour of teacher passes, when `distill` opens the cache
        cfg.objective().check_sparse_support("cache.mode=sample")
    rt = runtime.setup(cfg.device)
    teacher_path = models.resolve_model_path(cfg.teacher.path)
    teacher = models.load_causal_lm(teacher_path, resolve_model_dtype(cfg.teacher.dtype, rt.device), "teacher.path").to(rt.device).eval().requires_grad_(False)
    tokenizer = models.load_tokenizer(teacher_path)
    vocab = len(tokenizer)
    examples = load_cacheable_examples(cfg, tokenizer)
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
