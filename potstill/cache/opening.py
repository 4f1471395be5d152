"""Opening a teacher-signal cache for a training run, with every check made before step 1: the run's tokenizer is
the one the cache was built with (fingerprint; the cache's own ``tokenizer/`` stands in for the teacher's); every
training example is in the cache with the same tokens; the cache's temperature is the run's; the objective only
needs what the cache mode provides (sampled caches: forward-KL/CE-type terms; token selection and temperature
schedules: a dense or top-k cache at T = 1); every shard a run needs is intact."""
from __future__ import annotations

from pathlib import Path

from potstill.cache.format import CacheError, example_digest
from potstill.cache.reader import CacheReader
from potstill.cache.store import fingerprint_tokenizer
from potstill.config import RunConfig
from potstill.data.encode import Example
from potstill.models import load_tokenizer

TOKENIZER_DIR = "tokenizer"


def cached_tokenizer(cache_dir: str):
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
    if spec.mode == "topk":
        objective.check_label_logprobs(f"a top-k cache ({cfg.teacher.cache})")
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
