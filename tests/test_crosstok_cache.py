"""Cross-tokenizer caches: a cache built with the teacher's (word-level) tokenizer serves a student with the
built-in BPE tokenizer. The stored cross-tokenizer fields are the teacher's exact values, the cached target equals
the live teacher's, and every bad input is refused in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potstill.builtin.grammar import builtin_texts
from potstill.cache.crosstok import aligned_cache_target, check_cached_alignment, check_cross_tokenizer_spec
from potstill.cache.format import CacheError, CacheSpec
from potstill.cache.reader import CacheReader
from potstill.cache.store import build_cache
from potstill.crosstok.batches import Aligner
from potstill.crosstok.projection import projection_maps
from potstill.crosstok.targets import LiveAlignedTeacher, vocab_map
from potstill.data.batches import collate
from potstill.data.encode import encode_all
from potstill.models import HiddenAndHead, load_causal_lm, load_tokenizer

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def bpe_student(tmp_path_factory):
    """A tiny random student with the built-in BPE tokenizer (untied head, so the head's gradient is its own)."""
    from tests.conftest import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("bpe") / "student", "llama", load_tokenizer("builtin:bpe"), seed=7,
                           tie_word_embeddings=False)


def records(n: int = 6):
    texts = builtin_texts("validation", n)
    out = [(i, {"text": t}) for i, t in enumerate(texts[: n // 2])]
    out += [(i, {"prompt": t[:30], "completion": t[30:]}) for i, t in enumerate(texts[n // 2:], start=n // 2)]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, model_dirs):
    teacher = load_causal_lm(str(model_dirs["llama_teacher"])).eval()
    bpe = load_tokenizer("builtin:bpe")
    recs = records()
    teacher_examples, _ = encode_all(tokenizer, recs, MAX_LENGTH, "test")
    student_examples, _ = encode_all(bpe, recs, MAX_LENGTH, "test", annotate=Aligner(tokenizer, bpe))
    caches = {}
    for mode in ("dense", "topk"):
        spec = CacheSpec(mode=mode, vocab=len(tokenizer), k=8, temperature=2.0, shard_size=4, cross_tokenizer=True)
        caches[mode] = build_cache(tmp_path_factory.mktemp(mode), teacher, teacher_examples, spec,
                                   fingerprints={"tokenizer": "t"})
    plain = build_cache(tmp_path_factory.mktemp("plain"), teacher, teacher_examples,
                        CacheSpec(mode="dense", vocab=len(tokenizer), temperature=2.0), fingerprints={"tokenizer": "t"})
    mapping = vocab_map(tokenizer, bpe, len(tokenizer), len(bpe))
    projection = projection_maps(tokenizer, bpe, len(tokenizer), len(bpe))
    return dict(teacher=teacher, bpe=bpe, tok=tokenizer, teacher_examples=teacher_examples,
                student_examples=student_examples, caches=caches, plain=plain, mapping=mapping, projection=projection)


def test_cross_tokenizer_fields_are_the_teachers_tokens_and_t1_label_logprobs(setup):
    """input_ids are the cached example's tokens; label_logprobs[j] = log softmax(z_j)[ids[j+1]] at T = 1 even
    though the rows are stored at T = 2."""
    teacher, tok = setup["teacher"], setup["tok"]
    for mode, path in setup["caches"].items():
        reader = CacheReader(path)
        for e in setup["teacher_examples"]:
            stored = reader.read(e.example_id)
            assert stored["input_ids"].tolist() == e.input_ids
            with torch.no_grad():
                logits = teacher(torch.tensor([e.input_ids])).logits[0, :-1, : len(tok)].float()
            expected = F.log_softmax(logits, -1).gather(1, torch.tensor(e.input_ids[1:])[:, None])[:, 0]
            torch.testing.assert_close(stored["label_logprobs"], expected, rtol=1e-5, atol=1e-6)
            if mode == "dense":
                torch.testing.assert_close(stored["logprobs"], F.log_softmax(logits / 2.0, -1), rtol=1e-5, atol=1e-6)


def batch_of(setup, ids: list[int]) -> dict:
    chosen = [e for e in setup["student_examples"] if e.example_id in ids]
    return collate(chosen, setup["bpe"].pad_token_id)


def live_target(setup, batch):
    seam = HiddenAndHead(setup["teacher"], len(setup["tok"]))
    return LiveAlignedTeacher(seam, setup["mapping"], projection=setup["projection"]).target(batch)


def test_dense_cached_target_equals_the_live_teachers(setup):
    """Same masks, chunks, chunk log-likelihoods; the rows give the same teacher distribution at T."""
    reader = CacheReader(setup["caches"]["dense"])
    check_cross_tokenizer_spec(reader, ["uld"])
    check_cached_alignment(reader, setup["student_examples"])
    batch = batch_of(setup, [0, 1, 4, 5])
    live, cached = live_target(setup, batch), aligned_cache_target(reader, batch, setup["mapping"])
    for name in ("aligned", "exact", "chunk", "vocab_map", "prefix"):
        assert torch.equal(getattr(live, name), getattr(cached, name)), name
    assert bool(live.aligned.any()) and bool((live.chunk >= 0).any())
    torch.testing.assert_close(cached.chunk_teacher_logp, live.chunk_teacher_logp, rtol=1e-5, atol=1e-5)
    sl = slice(0, live.aligned.shape[0])
    where = live.aligned
    live_rows = F.log_softmax(live.rows.chunk_logits(sl).float() / 2.0, -1)[where]
    torch.testing.assert_close(cached.rows.chunk_logits(sl)[where], live_rows, rtol=1e-5, atol=1e-5)
    assert cached.rows.temperature == 2.0


def test_topk_cached_target_keeps_the_top_k_and_spreads_the_tail(setup):
    reader = CacheReader(setup["caches"]["topk"])
    batch = batch_of(setup, [0, 4])
    cached, dense = (aligned_cache_target(r, batch, setup["mapping"])
                     for r in (reader, CacheReader(setup["caches"]["dense"])))
    assert torch.equal(cached.chunk_teacher_logp, dense.chunk_teacher_logp)  # label log-probs are exact in top-k too
    rows, exact_rows = cached.rows.logits[cached.aligned], dense.rows.logits[cached.aligned]
    top = exact_rows.topk(8, -1)
    torch.testing.assert_close(rows.gather(1, top.indices), top.values, rtol=1e-2, atol=1e-3)  # fp16 storage
    rest = torch.ones_like(rows, dtype=torch.bool).scatter_(1, top.indices, False)
    tail = 1 - top.values.exp().sum(-1)
    spread = rows.masked_fill(~rest, float("nan"))
    vocab = rows.shape[1]
    torch.testing.assert_close(spread.nanmean(-1), (tail / (vocab - 8)).log(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(rows.exp().sum(-1), torch.ones(rows.shape[0]), rtol=2e-3, atol=0)


def test_a_cache_without_cross_tokenizer_fields_is_refused_in_one_line(setup):
    with pytest.raises(CacheError, match=r"has no cross-tokenizer fields \(input_ids, label_logprobs\).*uld.*rebuild") as err:
        check_cross_tokenizer_spec(CacheReader(setup["plain"]), ["uld"])
    assert "\n" not in str(err.value)


def test_a_sampled_cache_is_refused_for_a_cross_tokenizer_run(tmp_path, setup):
    spec = CacheSpec(mode="sample", vocab=len(setup["tok"]), samples=4, shard_size=8, cross_tokenizer=True)
    path = build_cache(tmp_path / "s", setup["teacher"], setup["teacher_examples"], spec, fingerprints={"tokenizer": "t"})
    dense = CacheReader(setup["caches"]["dense"])
    for e in setup["teacher_examples"]:  # the fields are stored beside the compacted draws, per position
        stored = CacheReader(path).read(e.example_id)
        assert stored["input_ids"].tolist() == e.input_ids
        torch.testing.assert_close(stored["label_logprobs"], dense.read(e.example_id)["label_logprobs"], rtol=1e-6, atol=0)
    with pytest.raises(CacheError, match="sample cache holds no teacher distribution.*cache.mode=dense"):
        check_cross_tokenizer_spec(CacheReader(path), ["alm"])


def test_other_teacher_tokens_or_too_few_cached_rows_are_refused(setup, tmp_path):
    reader = CacheReader(setup["caches"]["dense"])
    changed = setup["student_examples"][:1]
    original = changed[0].extra["xtok_teacher_ids"]
    changed[0].extra["xtok_teacher_ids"] = [original[0], 9, *original[2:]]
    try:
        with pytest.raises(CacheError, match="training example 0: the cache holds other teacher tokens"):
            check_cached_alignment(reader, changed)
    finally:
        changed[0].extra["xtok_teacher_ids"] = original
    short_examples, _ = encode_all(setup["tok"], records(), 8, "test")  # a cache built with max_length 8
    spec = CacheSpec(mode="dense", vocab=len(setup["tok"]), cross_tokenizer=True)
    short = build_cache(tmp_path / "short", setup["teacher"], short_examples, spec, fingerprints={"tokenizer": "t"})
    with pytest.raises(CacheError, match=r"training example 0: the run reads \d+ teacher positions but the cache holds 7.*data.max_length"):
        check_cached_alignment(CacheReader(short), setup["student_examples"])


@pytest.mark.parametrize("objective", ["uld", "alm", "gold", "0.5*ce + uld + alm(tau=10) + gold", "xproj",
                                       "0.5*ce + xproj(beta=0.5)"])
def test_a_cached_runs_loss_and_gradients_equal_the_live_runs(setup, bpe_student, objective):
    """The same batch and student through the one fused loss path: the dense cache's target gives the live
    teacher's loss and the same gradients w.r.t. the student's hidden states and head (T = 2, so the tempered
    rows and the T = 1 chunk likelihoods are both exercised)."""
    from potstill.losses.chunked import fused_loss
    from potstill.losses.objective import parse_objective

    bpe = setup["bpe"]
    torch.manual_seed(0)
    student = load_causal_lm(str(bpe_student)).eval()
    batch = batch_of(setup, [0, 1, 2, 3, 4, 5])
    reader = CacheReader(setup["caches"]["dense"])
    parsed = parse_objective(objective, temperature=2.0)
    results = []
    for target in (live_target(setup, batch), aligned_cache_target(reader, batch, setup["mapping"], setup["projection"])):
        student.zero_grad()
        h, weight, bias = HiddenAndHead(student, len(bpe))(batch["input_ids"], batch["attention_mask"])
        h.retain_grad()
        out = fused_loss(h[:, :-1], weight, bias, batch["labels"][:, 1:], parsed, target, chunk_size=16)
        out.total.backward()
        results.append((out.term_sums, h.grad.clone(), student.lm_head.weight.grad.clone()))
    (live_sums, live_h, live_w), (cached_sums, cached_h, cached_w) = results
    assert bool((live_sums > 0).all())
    torch.testing.assert_close(cached_sums, live_sums, rtol=1e-5, atol=0)
    scale = live_h.abs().max()
    torch.testing.assert_close(cached_h / scale, live_h / scale, rtol=1e-4, atol=1e-5)
    scale = live_w.abs().max()
    torch.testing.assert_close(cached_w / scale, live_w / scale, rtol=1e-4, atol=1e-5)

