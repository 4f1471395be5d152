"""Sequence packing (data.packing): exact layout, no attention across documents, the same loss, counts and
gradients as the padded batch (live teacher and every cache mode), refusal of models that leak, and a run."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig
from transformers.masking_utils import find_packed_sequence_indices

import potstill
from potstill.assemble import load_examples, load_parts
from potstill.cache.run import build_from_config
from potstill.config import RunConfig
from potstill.data.batches import Batcher
from potstill.data.encode import Example
from potstill.data.packing import first_fit_decreasing, packed_collate, padding_fraction
from potstill.labels import IGNORE_INDEX as X
from potstill.losses.reduce import count_valid_tokens
from potstill.models import hidden_states
from potstill.packing_check import check_packing, packing_gaps
from potstill.train import batch_loss, shifted

from conftest import save_tiny_model, seams, tiny_config

PAD = 0


def test_first_fit_decreasing_places_longest_first_into_the_first_row_with_room():
    # sorted: 6 (i4) → row 0, 5 (i0) → row 1, 4 (i2) → row 2, 3 (i1) → row 1 (full), 2 (i3) → row 0 (full)
    assert first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert first_fit_decreasing([4, 4, 4], 4) == [[0], [1], [2]]  # ties keep the batch order
    with pytest.raises(ValueError, match="does not fit a packed row of data.max_length=4"):
        first_fit_decreasing([5], 4)


def test_packing_never_computes_more_positions_than_padding():
    # rows of up to 10: [6, 4] and [6] are 2 × 10 positions, more than 3 × 6 padded: one example per row instead
    examples = [Example(i, [5] * n, [5] * n) for i, n in enumerate([6, 6, 4])]
    batch = packed_collate(examples, PAD, 10)
    assert batch["input_ids"].shape == (3, 6)
    assert batch["segments"].tolist() == [[0, 0, 6], [1, 0, 6], [2, 0, 4]]
    assert batch["labels"][:, 0].tolist() == [X, X, X]


def test_packed_collate_rows_positions_and_labels():
    examples = [Example(7, [10, 11, 12], [10, 11, 12]), Example(8, [20, 21], [X, 21]), Example(9, [30, 31, 32, 33], [30, 31, 32, 33])]
    batch = packed_collate(examples, PAD, 6)
    # longest first: example 9 opens row 0, example 7 does not fit its 2 free slots and opens row 1, example 8 fills row 0
    assert batch["input_ids"].tolist() == [[30, 31, 32, 33, 20, 21], [10, 11, 12, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # a document's first label would be the previous document's last prediction: never labelled
    assert batch["labels"].tolist() == [[X, 31, 32, 33, X, 21], [X, 11, 12, X, X, X]]
    assert batch["example_id"].tolist() == [7, 8, 9]
    assert batch["segments"].tolist() == [[1, 0, 3], [0, 4, 2], [0, 0, 4]]
    assert "attention_mask" not in batch  # so that transformers derives the mask from the position ids
    # ... which it does: one sequence index per document, the padding tail its own
    assert find_packed_sequence_indices(batch["position_ids"]).tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    padded = Batcher(examples, 3, 0, PAD).next_batch()
    assert count_valid_tokens([shifted(batch)]) == count_valid_tokens([shifted(padded)]) == 6
    assert padding_fraction([batch]) == pytest.approx(3 / 12, rel=1e-12)
    assert padding_fraction([padded]) == pytest.approx(3 / 12, rel=1e-12)  # 3 rows × 4, 9 tokens


def test_batcher_with_packing_keeps_the_data_order():
    examples = [Example(i, [5] * (2 + i % 5), [5] * (2 + i % 5)) for i in range(20)]
    plain, packed = Batcher(examples, 4, 3, PAD), Batcher(examples, 4, 3, PAD, pack_length=8)
    for _ in range(12):  # over several epochs
        a, b = plain.next_batch(), packed.next_batch()
        assert b["example_id"].tolist() == a["example_id"].tolist()
        assert b["input_ids"].shape[0] < 4  # packed into fewer rows
    assert packed.state() == plain.state()


def _gap(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_packed_document_computes_as_if_alone(arch, attention):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, 97), attn_implementation=attention).eval()
    examples = [Example(i, ids, ids) for i, ids in enumerate([list(range(3, 20)), list(range(40, 47)), list(range(60, 69))])]
    batch = packed_collate(examples, PAD, 20)
    assert batch["input_ids"].shape == (2, 17)  # 17 | 9 + 7 + one padding position
    with torch.no_grad():
        packed = hidden_states(model, batch["input_ids"], position_ids=batch["position_ids"])
        for e, (row, start, n) in zip(examples, batch["segments"].tolist()):
            alone = hidden_states(model, torch.tensor([e.input_ids]))[0]
            assert _gap(packed[row, start : start + n], alone) < 1e-5, (e.example_id, row, start)
    check_packing(model, "student")  # the load-time probe accepts it
    assert packing_gaps(model)[0] == 0.0  # masked documents contribute exact zeros


def _opt(vocab: int):
    return OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     word_embed_proj_dim=32, max_position_embeddings=256)


def test_packing_is_refused_for_a_model_that_attends_across_documents(tmp_path, model_dirs, text_jsonl, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_opt(97))  # OPT builds its mask and positions from attention_mask
    with pytest.raises(NotImplementedError, match=r"data.packing: OPTForCausalLM \(student, attention sdpa\) lets a "
                                                  r"packed document attend to the one before it"):
        check_packing(model, "student")
    opt_dir = tmp_path / "opt"
    AutoModelForCausalLM.from_config(_opt(len(tokenizer))).save_pretrained(opt_dir)
    tokenizer.save_pretrained(opt_dir)
    cfg = _cfg(model_dirs, text_jsonl, f"student.path={opt_dir}", f"out_dir={tmp_path / 'run'}", "data.packing=true")
    with pytest.raises(NotImplementedError, match="set data.packing=false for this model"):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused at load, before the run directory is made
    potstill.distill(_cfg(model_dirs, text_jsonl, f"student.path={opt_dir}", f"out_dir={tmp_path / 'plain'}",
                          "train.max_steps=1"), progress=False)  # the same model trains unpacked


def _cfg(model_dirs, data, *extra):
    return RunConfig.from_yaml(None, [f"teacher.path={model_dirs['llama_teacher']}", f"student.path={model_dirs['qwen2_student']}",
                                      f"data.train={data}", "data.max_length=128", "data.max_train_examples=40",
                                      "data.max_eval_examples=8", "train.batch_size=8", "train.max_steps=4",
                                      "train.log_every=1", "train.eval_every=0", "train.lr=0.01", "eval.max_new_tokens=3",
                                      "cache.shard_size=16", "cache.k=4", "cache.samples=16", "device=cpu", *extra])


@pytest.fixture(scope="module")
def caches(tmp_path_factory, model_dirs, text_jsonl):
    root = tmp_path_factory.mktemp("caches")
    for mode in ("dense", "topk", "sample"):
        build_from_config(_cfg(model_dirs, text_jsonl, f"teacher.cache={root / mode}", f"cache.mode={mode}"), progress=False)
    return root


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("signal,objective", [
    ("live", "0.5*ce + 0.5*gjsd(beta=0.5)"), ("live", "taid(alpha=0.2)"), ("live", "fkl"),
    ("dense", "0.5*ce + 0.5*gjsd(beta=0.5)"), ("topk", "rkl"), ("sample", "fkl")])
def test_packed_batch_gives_the_padded_batchs_loss_count_and_gradients(model_dirs, text_jsonl, caches, signal, objective):
    source = [] if signal == "live" else [f"teacher.cache={caches / signal}", "teacher.path="]
    select = ["loss.select=entropy(keep=0.5)"] if objective == "fkl" and signal == "live" else []
    cfg = _cfg(model_dirs, text_jsonl, f"loss.objective={objective}", *source, *select)
    parts = load_parts(cfg, torch.device("cpu"))
    assert (parts.cache is None) == (signal == "live")
    examples, _ = load_examples(cfg, parts.tokenizer)
    pad, objective = parts.tokenizer.pad_token_id, cfg.objective()
    padded = Batcher(examples, 8, 0, pad).next_batch()
    packed = Batcher(examples, 8, 0, pad, pack_length=128).next_batch()
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert padding_fraction([packed]) < padding_fraction([padded])
    results = []
    par = seams(parts)
    for batch in (padded, packed):
        parts.student.zero_grad(set_to_none=True)
        out = batch_loss(parts, par, batch, objective, chunk_size=50)
        out.total.backward()
        results.append((out, count_valid_tokens([shifted(batch)]), _grads(parts.student)))
    (a, count_a, grads_a), (b, count_b, grads_b) = results
    assert count_b == count_a == a.n_valid == b.n_valid
    assert b.total.item() == pytest.approx(a.total.item(), rel=1e-5)
    assert b.term_sums.tolist() == pytest.approx(a.term_sums.tolist(), rel=1e-5)
    assert b.n_kept == a.n_kept
    if a.nll_sums is not None:  # TAID tracks the label NLLs
        assert b.nll_sums.tolist() == pytest.approx(a.nll_sums.tolist(), rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert float((grads_b[name] - grads_a[name]).norm() / grads_a[name].norm()) < 1e-5, name


def _train_lines(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_packed_run_on_builtin_data_resumes_exactly_and_pads_less(tmp_path, dropout_student):
    def cfg(name, *extra):
        return RunConfig.from_yaml(None, ["teacher.path=builtin", f"student.path={dropout_student}", "data.train=builtin",
                                          "data.max_length=128", "data.max_train_examples=64", "data.max_eval_examples=8",
                                          "train.batch_size=8", "train.max_steps=6", "train.save_every=3",
                                          "train.eval_every=0", "train.log_every=1", "train.keep_checkpoints=3",
                                          "eval.max_new_tokens=3", "device=cpu", f"out_dir={tmp_path / name}", *extra])
    packed = potstill.distill(cfg("packed", "data.packing=true"), progress=False)
    plain = potstill.distill(cfg("plain"), progress=False)
    full = _train_lines(packed.run_dir)
    # same batches, same tokens; the dropout student's masks fall on other positions, so the losses only agree roughly
    assert [r["tokens"] for r in full] == [r["tokens"] for r in _train_lines(plain.run_dir)]
    before = [r["padding"] for r in _train_lines(plain.run_dir)]
    after = [r["padding"] for r in full]
    assert all(a <= b for a, b in zip(after, before)) and sum(after) < 0.6 * sum(before), (before, after)
    print(f"padding fraction: padded {sum(before) / 6:.3f}, packed {sum(after) / 6:.3f}")
    shutil.rmtree(packed.run_dir / "checkpoints" / "step-0000006")  # a crash after step 4
    shutil.rmtree(packed.run_dir / "final")
    lines = (packed.run_dir / "metrics.jsonl").read_text().splitlines()
    (packed.run_dir / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 4) + "\n")
    resumed = _train_lines(potstill.distill(cfg("packed", "data.packing=true"), resume=True, progress=False).run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit-identical
