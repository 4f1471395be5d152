"""Building the on-disk teacher-signal cache: once, resumable, shardable over ranks (``reader.py`` reads it).

Layout, tensor names and integrity rules: docs/cache-format.md. The format itself (spec, per-mode encoding,
records, value checks) is ``format.py``; this module runs the teacher and writes shards atomically.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from potstill.data.batches import collate
from potstill.data.encode import Example
from potstill.io import atomic_write_text
from potstill.losses.chunked import project_chunks
from potstill.models import hidden_states, output_head, output_size
from potstill.cache.format import (
    FORMAT, FORMAT_VERSION, MANIFEST, CacheError, CacheSpec, build_key, decode, dumps, encode_chunk, example_digest,
    example_uniforms, finish_example, manifest_record, read_json, sha256_file, shard_file, sidecar_file, signal_problem,
    tensor_key, tensor_layout,
)

__all__ = ["CacheError", "CacheSpec", "build_cache", "build_cache_from", "finalize_manifest", "fingerprint_examples",
           "fingerprint_model", "fingerprint_tokenizer"]

SIDECAR_KEYS = ("build_key", "file", "example_ids", "lengths", "digests", "positions", "tensor_bytes", "bytes", "sha256")


# ---- fingerprints ----------------------------------------------------------------------------------------------

def fingerprint_model(model) -> str:
    """sha256 over the config (minus load-location/version keys) and every parameter's name, dtype, shape, bytes."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():  # one tensor at a time: never the whole model on the CPU
        flat = tensor.detach().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 of the vocabulary sorted by id, the special tokens and the chat template."""
    record = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special": {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())},
        "special_ids": sorted(tokenizer.all_special_ids),
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def fingerprint_examples(examples: list[Example]) -> str:
    """sha256 over (example_id, length, input_ids, labels) of every example, in order, as little-endian int64."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(np.asarray([e.example_id, len(e.input_ids)], dtype="<i8").tobytes())
        digest.update(np.asarray(e.input_ids, dtype="<i8").tobytes())
        digest.update(np.asarray(e.labels, dtype="<i8").tobytes())
    return digest.hexdigest()


# ---- building --------------------------------------------------------------------------------------------------

def _encode_example(hidden: Tensor, weight: Tensor, bias: Tensor | None, example: Example, spec: CacheSpec) -> dict[str, Tensor]:
    """hidden (P, H): the teacher's last hidden states at the P = L − 1 predicted positions of one example.
    Logits are projected one chunk of positions at a time (chunk × V at most, never B·T·V)."""
    example_id = example.example_id
    next_ids = torch.tensor(example.input_ids[1:], dtype=torch.long)  # (P,) the token each position is followed by
    uniforms = example_uniforms(spec, example_id, hidden.shape[0]) if spec.mode == "sample" else None  # (P, K)
    parts = []
    for sl, z in project_chunks(hidden, weight, bias, chunk_size=0):
        if bool((z.isnan() | (z == float("inf"))).any()):
            raise CacheError(f"the teacher produced NaN or +inf logits for example {example_id}: nothing was written "
                             "for its shard; check the teacher (an fp16 overflow? try teacher.dtype=bfloat16)")
        parts.append(encode_chunk(z, spec, None if uniforms is None else uniforms[sl], next_ids[sl]))
    if not parts:  # a one-token example predicts nothing: store correctly-shaped empty tensors
        empty = torch.zeros(0, spec.vocab, device=weight.device)
        parts = [encode_chunk(empty, spec, None if uniforms is None else uniforms[:0], next_ids[:0])]
    return finish_example(parts, spec, example.input_ids)


@torch.no_grad()
def _encode_shard(teacher, examples: list[Example], spec: CacheSpec, batch_size: int, advance) -> dict[str, Tensor]:
    """Every stored tensor of one shard, keyed ``{example_id}/{name}``. Batches are formed from length-sorted
    examples (less padding); results do not depend on batching, since each example is encoded on its own rows."""
    weight, bias = output_head(teacher, spec.vocab)  # (V, H), (V,) | None
    device = weight.device
    tensors: dict[str, Tensor] = {}
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        padded = collate(batch, pad_id=0)
        hidden = hidden_states(teacher, padded["input_ids"].to(device), padded["attention_mask"].to(device))  # (B, T, H)
        for row, example in enumerate(batch):
            positions = max(len(example.input_ids) - 1, 0)
            encoded = _encode_example(hidden[row, :positions], weight, bias, example, spec)
            tensors.update({tensor_key(example.example_id, name): t.contiguous() for name, t in encoded.items()})
        advance(len(batch))
    return tensors


def _write_shard(out_dir: Path, index: int, tensors: dict[str, Tensor], examples: list[Example], key: str) -> dict:
    """Write the shard under a temporary name, checksum it, rename it; then its sidecar (atomically, after)."""
    path = out_dir / shard_file(index)
    tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
        sha, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = {
        "format_version": FORMAT_VERSION, "build_key": key, "shard": index, "file": path.name,
        "example_ids": [e.example_id for e in examples], "lengths": [len(e.input_ids) for e in examples],
        "digests": [example_digest(e.input_ids) for e in examples],
        "positions": sum(max(len(e.input_ids) - 1, 0) for e in examples),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "bytes": size, "sha256": sha,
    }
    atomic_write_text(out_dir / sidecar_file(index), dumps(sidecar))
    return sidecar


def _completed_sidecar(out_dir: Path, index: int, key: str, examples: list[Example] | None = None) -> dict | None:
    """The shard's sidecar when the shard is done (sidecar present, file of the recorded size), else None.
    A sidecar from a different build (spec, fingerprints or examples) is an error, never silently mixed in."""
    path = out_dir / sidecar_file(index)
    if not path.exists():
        return None
    sidecar = read_json(path, SIDECAR_KEYS)
    if sidecar["build_key"] != key:
        raise CacheError(f"{path} belongs to a cache built with a different spec or fingerprints; "
                         f"use a new directory or delete {out_dir} and build again")
    if examples is not None and (sidecar["example_ids"] != [e.example_id for e in examples]
                                 or sidecar.get("digests") != [example_digest(e.input_ids) for e in examples]):
        raise CacheError(f"{path} holds different examples than this build assigns to shard {index}; "
                         f"use a new directory or delete {out_dir} and build again")
    shard = out_dir / sidecar["file"]
    return sidecar if shard.exists() and shard.stat().st_size == sidecar["bytes"] else None


def _check_examples(examples: list[Example]) -> None:
    if not examples:
        raise CacheError("no examples to cache")
    seen: set[int] = set()
    for e in examples:
        if e.example_id in seen:
            raise CacheError(f"example id {e.example_id} appears twice; the cache is keyed by example id")
        seen.add(e.example_id)


def _check_signals(tensors: dict[str, Tensor], examples: list[Example], spec: CacheSpec) -> None:
    """Never write a signal a reader would refuse (whatever encoder produced it: HF teacher, vLLM)."""
    for e in examples:
        signal = {name: decode(name, tensors[tensor_key(e.example_id, name)]) for name in tensor_layout(spec)}
        problem = signal_problem(signal, spec)
        if problem:
            raise CacheError(f"example {e.example_id} was encoded wrongly ({problem}): nothing was written "
                             "for its shard; this is a bug in the encoder or the teacher")


def _check_teacher(teacher, spec: CacheSpec) -> None:
    if teacher.training:
        raise CacheError("the teacher is in training mode (dropout would make the cache random): call teacher.eval()")
    if output_size(teacher) < spec.vocab:
        raise CacheError(f"the teacher's head has {output_size(teacher)} rows but the cache spec says vocab={spec.vocab}")


def _check_existing_manifest(out_dir: Path, key: str) -> None:
    path = out_dir / MANIFEST
    if path.exists() and read_json(path).get("build_key") != key:
        raise CacheError(f"{out_dir} already holds a cache built with a different spec or fingerprints; "
                         "use a new directory or delete it and build again")


class _Progress:
    """A rich bar over examples, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from rich.progress import Progress
            self.bar = Progress(transient=False)
            self.task = self.bar.add_task("teacher cache", total=total)
            self.bar.start()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def build_cache(out_dir, teacher, examples: list[Example], spec: CacheSpec, *, fingerprints: dict[str, str],
                batch_size: int = 8, rank: int = 0, world_size: int = 1, progress: bool = False) -> Path:
    """Run the teacher (an HF model on its device, eval mode) teacher-forced over ``examples`` and store its
    signal (see ``build_cache_from`` for sharding, resume and the manifest). Returns ``out_dir``."""
    _check_teacher(teacher, spec)
    encode = lambda members, advance: _encode_shard(teacher, members, spec, batch_size, advance)  # noqa: E731
    return build_cache_from(out_dir, examples, spec, encode, fingerprints=fingerprints, rank=rank,
                            world_size=world_size, progress=progress)


def build_cache_from(out_dir, examples: list[Example], spec: CacheSpec, encode_shard, *, fingerprints: dict[str, str],
                     rank: int = 0, world_size: int = 1, progress: bool = False) -> Path:
    """Store the signals ``encode_shard(examples, advance) -> {"{id}/{name}": tensor}`` computes for each shard.

    Shard i holds examples[i·shard_size : (i+1)·shard_size]; this rank builds shards with i % world_size == rank
    and skips those already complete (resume). Once every shard's sidecar exists — after the last rank finishes,
    or via ``finalize_manifest`` — the manifest is written. Any signal source (an HF teacher, vLLM) plugs in here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_examples(examples)
    key = build_key(spec, fingerprints)
    _check_existing_manifest(out_dir, key)
    n_shards = math.ceil(len(examples) / spec.shard_size)
    shards = {i: examples[i * spec.shard_size : (i + 1) * spec.shard_size] for i in range(rank, n_shards, world_size)}
    todo = [i for i, members in shards.items() if _completed_sidecar(out_dir, i, key, members) is None]
    bar = _Progress(sum(len(shards[i]) for i in todo), progress)
    try:
        for index in todo:
            tensors = encode_shard(shards[index], bar.advance)
            _check_signals(tensors, shards[index], spec)
            _write_shard(out_dir, index, tensors, shards[index], key)
    finally:
        bar.close()
    if all((out_dir / sidecar_file(i)).exists() for i in range(n_shards)):
        finalize_manifest(out_dir, spec, fingerprints, n_shards)
    return out_dir


def finalize_manifest(out_dir, spec: CacheSpec, fingerprints: dict[str, str], n_shards: int) -> Path:
    """Merge the per-shard sidecars into ``manifest.json`` (atomically). Any process may call it once all shards
    are built; the result is deterministic, so concurrent callers write identical bytes."""
    out_dir = Path(out_dir)
    key = build_key(spec, fingerprints)
    sidecars = [_completed_sidecar(out_dir, i, key) for i in range(n_shards)]
    missing = [i for i, s in enumerate(sidecars) if s is None]
    if missing:
        listed = ", ".join(shard_file(i) for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CacheError(f"{len(missing)} of {n_shards} shards are not built yet ({listed}): run build_cache for "
                         "the ranks that own them (shard i belongs to rank i % world_size), then finalize again")
    return atomic_write_text(out_dir / MANIFEST, dumps(manifest_record(spec, fingerprints, sidecars)))
