"""The teacher-signal cache's storage layer: exact round trips per mode, deterministic sampling, narrow ids,
resumable and rank-sharded builds that are byte-identical to an uninterrupted one, and integrity errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import potstill.cache.store as cache_module
from potstill.data.encode import Example
from potstill.cache.reader import CacheReader
from potstill.cache.store import (
    CacheError, CacheSpec, build_cache, finalize_manifest, fingerprint_examples, fingerprint_model, fingerprint_tokenizer,
)
from potstill.cache.format import id_dtype, payload_bytes_per_position

V = 64
LENGTHS = [7, 3, 12, 1, 5, 9, 2]  # includes a one-token example (no predicted positions)
FINGERPRINTS = {"teacher": "t-abc", "tokenizer": "tok-123", "data": "d-xyz"}


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for n, length in enumerate(LENGTHS):
        ids = torch.randint(1, V, (length,), generator=gen).tolist()
        labels = [-100] + ids[1:] if n % 2 else list(ids)
        out.append(Example(100 + 7 * n, ids, labels))  # ids that are not positions in the list
    return out


def teacher_logp(teacher, example: Example, temperature: float) -> torch.Tensor:
    """Reference: log_softmax(model(input_ids).logits / T)[:-1], shape (L-1, V)."""
    with torch.no_grad():
        logits = teacher(torch.tensor([example.input_ids])).logits[0, :-1]
    return F.log_softmax(logits.float() / temperature, -1)


def assert_fp16_equal(stored: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to fp16 rounding: within half an fp16 ulp (2^-11 relative) plus fp32 noise."""
    assert stored.shape == reference.shape
    assert bool(((stored - reference).abs() <= reference.abs() * 2**-11 + 1e-5).all())


def build(tmp: Path, teacher, examples, **spec_kwargs) -> Path:
    kwargs = dict(fingerprints=FINGERPRINTS, batch_size=spec_kwargs.pop("batch_size", 3))
    return build_cache(tmp, teacher, examples, CacheSpec(vocab=V, **spec_kwargs), **kwargs)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_dense_round_trip(tmp_path, teacher, examples):
    reader = CacheReader(build(tmp_path, teacher, examples, mode="dense", temperature=2.0, shard_size=3))
    assert sorted(reader.example_ids) == sorted(e.example_id for e in examples)
    for e in examples:
        got = reader.read(e.example_id)
        assert set(got) == {"logprobs"} and got["logprobs"].dtype == torch.float32
        torch.testing.assert_close(got["logprobs"], teacher_logp(teacher, e, 2.0), rtol=1e-5, atol=1e-5)
    assert reader.read(examples[3].example_id)["logprobs"].shape == (0, V)


def test_topk_round_trip(tmp_path, teacher, examples):
    reader = CacheReader(build(tmp_path, teacher, examples, mode="topk", k=5, temperature=1.5))
    for e in examples:
        got = reader.read(e.example_id)
        top, ids = teacher_logp(teacher, e, 1.5).topk(5, dim=-1)
        assert got["ids"].dtype == torch.int64 and torch.equal(got["ids"], ids)
        assert_fp16_equal(got["logprobs"], top)
        assert_fp16_equal(got["tail_mass"], 1 - top.exp().sum(-1))


def test_ids_use_the_narrowest_dtype(tmp_path, teacher, examples):
    out = build(tmp_path, teacher, examples, mode="topk", k=4)
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as fh:
        assert fh.get_tensor(f"{examples[0].example_id}/ids").dtype == torch.uint16
        assert fh.get_tensor(f"{examples[0].example_id}/logprobs").dtype == torch.float16
    assert id_dtype(65536) == torch.uint16 and id_dtype(65537) == torch.int32 and id_dtype(151_936) == torch.int32


def test_sample_counts_and_draws_do_not_depend_on_batching(tmp_path, teacher, examples):
    K = 255
    a = CacheReader(build(tmp_path / "a", teacher, examples, mode="sample", samples=K, seed=7, batch_size=3))
    b = CacheReader(build(tmp_path / "b", teacher, examples[::-1], mode="sample", samples=K, seed=7,
                          batch_size=1, shard_size=3))
    gaps = []
    for e in examples:
        got = a.read(e.example_id)
        assert set(got) == {"ids", "counts"}
        assert torch.equal(got["counts"].sum(-1), torch.full((len(e.input_ids) - 1,), float(K)))
        assert bool(((got["ids"] >= 0) & (got["ids"] < V)).all())
        other = b.read(e.example_id)
        assert torch.equal(got["ids"], other["ids"]) and torch.equal(got["counts"], other["counts"])
        # empirical frequency of the teacher's most likely token vs its probability (K = 255 draws)
        p = teacher_logp(teacher, e, 1.0).exp()
        p_top, top = p.max(-1)
        freq = ((got["ids"] == top[:, None]) * got["counts"]).sum(-1) / K
        assert bool(((freq - p_top).abs() <= 5 * (p_top * (1 - p_top) / K).sqrt() + 1 / K).all())
        gaps.append((freq - p_top).abs())
    assert float(torch.cat(gaps).mean()) < 0.04


def test_sample_with_a_tempered_proposal_stores_the_log_importance_ratio(tmp_path, teacher, examples):
    reader = CacheReader(build(tmp_path, teacher, examples, mode="sample", samples=16, temperature=1.0,
                               proposal_temperature=2.0))
    for e in examples[:3]:
        got = reader.read(e.example_id)
        assert set(got) == {"ids", "counts", "log_ratio"}
        used = got["counts"] > 0
        expected = (teacher_logp(teacher, e, 1.0) - teacher_logp(teacher, e, 2.0)).gather(-1, got["ids"])
        torch.testing.assert_close(got["log_ratio"][used], expected[used], rtol=1e-5, atol=5e-6)  # absolute: the fp32 reference's log-normaliser error (~6e-7 seen) does not scale with the value
        assert bool((got["ids"][~used] == 0).all()) and bool((got["log_ratio"][~used] == 0).all())


def test_bytes_per_position(tmp_path, teacher, examples):
    positions = sum(n - 1 for n in LENGTHS)
    for mode, extra in (("dense", {}), ("topk", {"k": 8}), ("sample", {"samples": 32})):
        reader = CacheReader(build(tmp_path / mode, teacher, examples, mode=mode, **extra))
        m = reader.manifest
        assert m["n_positions"] == positions and reader.bytes_per_position() == round(m["total_bytes"] / positions, 3)
        if mode != "sample":
            assert m["tensor_bytes"] == positions * payload_bytes_per_position(reader.spec)
    assert payload_bytes_per_position(CacheSpec(mode="topk", vocab=V, k=8)) == 8 * 2 + 2 * 8 + 2
    assert payload_bytes_per_position(CacheSpec(mode="topk", vocab=151_936, k=8)) == 8 * 4 + 2 * 8 + 2


def test_resume_is_byte_identical_and_skips_finished_shards(tmp_path, teacher, examples, monkeypatch):
    full = files_of(build(tmp_path / "full", teacher, examples, mode="topk", k=4, shard_size=2))
    assert len([n for n in full if n.endswith(".safetensors")]) == 4
    out = build(tmp_path / "resumed", teacher, examples, mode="topk", k=4, shard_size=2)
    (out / "shard-00003.safetensors").unlink()
    (out / "shard-00003.json").unlink()
    (out / "manifest.json").unlink()
    (out / "shard-00001.json").unlink()  # crash after shard 1's rename, before its sidecar
    encoded = []
    real = cache_module._encode_shard
    monkeypatch.setattr(cache_module, "_encode_shard", lambda t, ex, *a: encoded.append(len(ex)) or real(t, ex, *a))
    build(out, teacher, examples, mode="topk", k=4, shard_size=2)
    assert encoded == [2, 1]  # shards 1 and 3 only
    assert files_of(out) == full
    build(out, teacher, examples, mode="topk", k=4, shard_size=2)  # complete: nothing to do
    assert encoded == [2, 1] and files_of(out) == full


def test_two_ranks_then_finalize_equals_single_process(tmp_path, teacher, examples):
    single = files_of(build(tmp_path / "single", teacher, examples, mode="dense", shard_size=2))
    spec = CacheSpec(mode="dense", vocab=V, shard_size=2)
    out = tmp_path / "ranks"
    build_cache(out, teacher, examples, spec, fingerprints=FINGERPRINTS, batch_size=3, rank=0, world_size=2)
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="shard-00001.safetensors, shard-00003.safetensors"):
        finalize_manifest(out, spec, FINGERPRINTS, n_shards=4)
    build_cache(out, teacher, examples, spec, fingerprints=FINGERPRINTS, batch_size=3, rank=1, world_size=2)
    (out / "manifest.json").unlink()  # the last rank wrote it; finalize must produce the same bytes
    finalize_manifest(out, spec, FINGERPRINTS, n_shards=4)
    assert files_of(out) == single


def test_a_different_build_in_the_same_directory_is_refused(tmp_path, teacher, examples):
    out = build(tmp_path, teacher, examples, mode="topk", k=4, shard_size=2)
    with pytest.raises(CacheError, match="different spec or fingerprints"):
        build(out, teacher, examples, mode="topk", k=5, shard_size=2)
    with pytest.raises(CacheError, match="head has 64 rows but the cache spec says vocab=65"):
        build_cache(tmp_path / "wide", teacher, examples, CacheSpec(mode="dense", vocab=65), fingerprints={})


def test_corrupted_and_truncated_shards_are_reported(tmp_path, teacher, examples):
    out = build(tmp_path, teacher, examples, mode="topk", k=4, shard_size=2)
    pristine = files_of(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(pristine[shard.name])
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(out)
    reader.read(examples[0].example_id)  # other shards still read fine
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is corrupted.*delete it and re-run"):
        reader.read(examples[2].example_id)
    shard.write_bytes(pristine[shard.name][:-10])
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors is truncated"):
        CacheReader(out, verify=False).read(examples[3].example_id)
    shard.unlink()  # the advice: delete it and re-run; the resumed build restores the same bytes
    build(out, teacher, examples, mode="topk", k=4, shard_size=2)
    assert files_of(out) == pristine


def test_expectations_and_missing_examples(tmp_path, teacher, examples):
    out = build(tmp_path, teacher, examples, mode="topk", k=4, temperature=2.0)
    CacheReader(out, expect={"tokenizer": "tok-123", "temperature": "2", "mode": "topk"})
    with pytest.raises(CacheError, match="built with tokenizer fingerprint tok-123, this run has tok-999: rebuild"):
        CacheReader(out, expect={"tokenizer": "tok-999"})
    with pytest.raises(CacheError, match="built with temperature=2.0, this run has 1.0"):
        CacheReader(out, expect={"temperature": "1.0"})
    with pytest.raises(CacheError, match="records no 'student'"):
        CacheReader(out, expect={"student": "x"})
    reader = CacheReader(out)
    assert reader.has(examples[0].example_id) and not reader.has(999)
    with pytest.raises(CacheError, match=r"example 999 is not in the cache \(built over 7 examples\)"):
        reader.read(999)
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(tmp_path / "nowhere")


def test_fingerprints(teacher, examples, tokenizer):
    base = fingerprint_model(teacher)
    assert base == fingerprint_model(teacher) and len(base) == 64
    changed = LlamaForCausalLM(teacher.config)
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.model.norm.weight[0] += 1e-3
    assert fingerprint_model(changed) != base
    relabelled = [Example(e.example_id, e.input_ids, [-100] * len(e.labels)) for e in examples]
    assert fingerprint_examples(examples) == fingerprint_examples(list(examples))
    assert fingerprint_examples(relabelled) != fingerprint_examples(examples)
    assert fingerprint_tokenizer(tokenizer) == fingerprint_tokenizer(tokenizer)


# ---- damaged caches: every problem is one CacheError naming the file and the fix ------------------------------

def rewrite_shard(out: Path, index: int, mutate) -> None:
    """What a faulty build would leave: a shard with other tensor values, with matching size and sha256."""
    from safetensors.torch import load_file, save_file
    from potstill.cache.format import FORMAT, FORMAT_VERSION, sha256_file

    path = out / f"shard-{index:05d}.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][index] |= {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("mode, name, value", [("topk", "logprobs", float("nan")), ("topk", "tail_mass", float("inf")),
                                               ("sample", "log_ratio", float("-inf")), ("sample", "counts", 3)])
def test_values_written_by_a_faulty_build_are_reported(tmp_path, teacher, examples, mode, name, value):
    kwargs = {"k": 4} if mode == "topk" else {"samples": 8, "proposal_temperature": 2.0}
    out = build(tmp_path, teacher, examples, mode=mode, shard_size=2, **kwargs)
    victim = examples[2].example_id  # shard 1

    def poison(tensors):
        t = tensors[f"{victim}/{name}"].view(-1)
        t[0] = value if name != "counts" else t[0] + value

    rewrite_shard(out, 1, poison)
    reader = CacheReader(out)
    reader.check_shards([examples[0].example_id])  # other shards are fine
    problem = "NaN or inf" if name != "counts" else "counts do not sum to K = 8"
    with pytest.raises(CacheError, match=rf"shard-00001\.safetensors is damaged at example {victim} \(its .*{problem}.*"
                                         r"delete it and re-run `potstill cache`"):
        reader.check_shards([victim])
    with pytest.raises(CacheError, match=rf"damaged at example {victim}"):
        CacheReader(out, verify=False).read(victim)  # no scan at open without verify, but every read is checked


def test_a_teacher_with_nan_logits_writes_nothing(tmp_path, teacher, examples):
    broken = LlamaForCausalLM(teacher.config).eval()
    broken.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        broken.lm_head.weight[5] = float("nan")
    with pytest.raises(CacheError, match=r"NaN or \+inf logits for example \d+: nothing was written"):
        build(tmp_path, broken, examples, mode="sample", samples=8, shard_size=2)
    assert not list(tmp_path.glob("shard-*"))


def test_missing_and_unreadable_shards_are_reported(tmp_path, teacher, examples):
    out = build(tmp_path, teacher, examples, mode="topk", k=4, shard_size=2)
    pristine = files_of(out)
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + pristine[shard.name][8:])  # a garbled header, same size
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors cannot be read .*delete it and re-run `potstill cache`"):
        CacheReader(out, verify=False).check_shards([examples[4].example_id])
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors is missing: re-run `potstill cache`"):
        CacheReader(out).check_shards([e.example_id for e in examples])
    build(out, teacher, examples, mode="topk", k=4, shard_size=2)  # the advice works: same bytes again
    assert files_of(out) == pristine


def test_garbled_manifest_and_sidecars_are_reported(tmp_path, teacher, examples):
    out = build(tmp_path, teacher, examples, mode="topk", k=4, shard_size=2)
    pristine = files_of(out)
    manifest = out / "manifest.json"
    record = json.loads(pristine["manifest.json"])
    without_sha = json.loads(pristine["manifest.json"])
    del without_sha["shards"][1]["sha256"]
    for garbled, why in ((b'{"format": "potstill-teacher-cache", "shards": [', "is not valid JSON"),
                         (b"\xff\xfe\x00garbage", "is not valid JSON"),
                         (json.dumps({k: v for k, v in record.items() if k != "shards"}).encode(), r"is damaged \(no shards\)"),
                         (json.dumps(without_sha).encode(), r"is damaged \(KeyError: 'shard record 1 lacks file, bytes or sha256'\)")):
        manifest.write_bytes(garbled)
        with pytest.raises(CacheError, match=rf"manifest\.json {why}.*delete it and re-run `potstill cache`"):
            CacheReader(out)
    sidecar = out / "shard-00001.json"
    sidecar.write_text("{}")
    with pytest.raises(CacheError, match=r"shard-00001\.json is damaged \(no build_key"):
        build(out, teacher, examples, mode="topk", k=4, shard_size=2)
    sidecar.write_bytes(b"\x00\x01")
    with pytest.raises(CacheError, match=r"shard-00001\.json is not valid JSON"):
        build(out, teacher, examples, mode="topk", k=4, shard_size=2)
    manifest.unlink()  # the advice: delete both and re-run; finished shards are kept, the rest rebuilt
    sidecar.unlink()
    build(out, teacher, examples, mode="topk", k=4, shard_size=2)
    assert files_of(out) == pristine


def test_an_encoder_producing_nan_writes_nothing(tmp_path, examples):
    """The writer checks what any encoder (HF teacher, vLLM) hands it before a shard is written."""
    spec = CacheSpec(mode="topk", vocab=V, k=2, shard_size=2)

    def encode(members, advance):
        rows = {e.example_id: len(e.input_ids) - 1 for e in members}
        return {f"{i}/{name}": t for i, p in rows.items() for name, t in (
            ("ids", torch.zeros(p, 2, dtype=torch.uint16)), ("logprobs", torch.full((p, 2), float("nan")).half()),
            ("tail_mass", torch.zeros(p).half()))}

    with pytest.raises(CacheError, match=r"example 100 was encoded wrongly \(its logprobs holds NaN or inf\)"):
        cache_module.build_cache_from(tmp_path, examples, spec, encode, fingerprints=FINGERPRINTS)
    assert not list(tmp_path.glob("shard-*"))


def test_non_contiguous_example_ids_and_a_training_subset(tmp_path, teacher):
    """Example ids are record positions in their file: every 50th record held out for validation leaves gaps
    (…, 48, 50, …), and a run may train on a subset of what was cached. Lookups are by id, so both work."""
    from potstill.cache.opening import check_examples_cached
    from potstill.cache.targets import batch_target, sampled_weights
    from potstill.data.batches import collate

    gen = torch.Generator().manual_seed(2)
    ids = [i for i in range(130) if i % 50 != 49]  # 49 and 99 are held out
    cached = [Example(i, torch.randint(1, V, (2 + i % 5,), generator=gen).tolist(), None) for i in ids]
    cached = [Example(e.example_id, e.input_ids, list(e.input_ids)) for e in cached]
    spec = CacheSpec(mode="sample", vocab=V, samples=8, proposal_temperature=2.0, shard_size=16)
    reader = CacheReader(build_cache(tmp_path, teacher, cached, spec, fingerprints=FINGERPRINTS))
    assert reader.example_ids == ids and reader.manifest["n_examples"] == 128
    subset = cached[47:53] + cached[95:101:2]  # around both gaps, across shards
    check_examples_cached(reader, subset)
    with pytest.raises(CacheError, match="training example 49 is not in the cache"):
        check_examples_cached(reader, subset + [Example(49, [1, 2, 3], [1, 2, 3])])
    batch = collate(subset, pad_id=0)
    target = batch_target(reader, batch, V)
    width, positions = target.ids.shape[-1], batch["input_ids"].shape[1] - 1
    for row, e in enumerate(subset):
        stored = reader.read(e.example_id)
        rows = slice(row * positions, row * positions + len(e.input_ids) - 1)
        pad = width - stored["ids"].shape[-1]
        assert torch.equal(target.ids[rows], F.pad(stored["ids"], (0, pad)))
        assert torch.equal(target.weights[rows], F.pad(sampled_weights(stored, spec), (0, pad)))
        assert torch.equal(stored["ids"], CacheReader(build_cache(tmp_path / f"alone{row}", teacher, [e], spec,
                                                                  fingerprints=FINGERPRINTS)).read(e.example_id)["ids"])
