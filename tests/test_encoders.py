"""Classifier and sentence-embedding distillation through the one loop (potstill/encoders/, docs/encoders.md), on
tiny BERT / Llama classifiers built from configs with the built-in tokenizer."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertModel,
                          LlamaConfig, LlamaForSequenceClassification)

from conftest import seams
from potstill.assemble import load_examples, load_parts
from potstill.config import RunConfig
from potstill.data.batches import collate
from potstill.encoders import lelp, seam
from potstill.encoders.embedding import embedding_loss
from potstill.encoders.evaluation import spearman
from potstill.train import batch_loss, distill

CLASSES = 3
FIELDS = ("directions", "means", "stds", "q")  # an LELP split's tensors


def bert_config(tok, hidden=32, layers=2, **kw):
    return BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=2 * hidden, pad_token_id=tok.pad_token_id, max_position_embeddings=128, **kw)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("classifiers")
    torch.manual_seed(0)
    BertForSequenceClassification(bert_config(tokenizer, num_labels=CLASSES)).save_pretrained(root / "bert")
    llama = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=CLASSES,
                        pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(llama).save_pretrained(root / "llama")
    BertModel(bert_config(tokenizer)).save_pretrained(root / "encoder")
    for name in ("bert", "llama", "encoder"):
        tokenizer.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def labelled_jsonl(tmp_path_factory):
    from potstill.builtin import builtin_texts

    path = tmp_path_factory.mktemp("data") / "labelled.jsonl"
    texts = [" ".join(t.split()[:12]) for t in builtin_texts("train", 120)]
    path.write_text("".join(json.dumps({"text": t, "label": i % CLASSES}) + "\n" for i, t in enumerate(texts)))
    return path


def run_config(tmp_path, teacher, data, *overrides, kind="sequence_classification"):
    return RunConfig.from_yaml(None, [f"teacher.path={teacher}", "student.init_from_teacher_layers=1",
                                      f"data.train={data}", f"task.kind={kind}", "train.batch_size=6",
                                      "train.max_steps=4", "train.report_to=none", f"out_dir={tmp_path / 'run'}",
                                      "data.max_length=32", *overrides])


def first_batch(cfg, parts, n=6):
    train, _ = load_examples(cfg, parts.tokenizer)
    return collate(train[:n], parts.tokenizer.pad_token_id)


def assert_grads_close(ours: dict, model) -> None:
    """Every parameter's gradient equals the reference's to 1e-4 of its norm; gradients that are zero in exact
    arithmetic (a key bias under softmax) are held to 1e-4 of the whole gradient's norm instead."""
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(ours) == set(reference)
    total = float(torch.cat([g.flatten() for g in reference.values()]).norm())
    for name, grad in reference.items():
        assert float((ours[name] - grad).norm()) <= 1e-4 * max(float(grad.norm()), total * 1e-3), name


# --- the seam ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_classifier_seam_reproduces_the_models_logits(classifiers, tokenizer, arch):
    """head(pooled) == the model's own logits, on a right-padded batch (BERT: pooler; Llama: last non-pad token)."""
    model = AutoModelForSequenceClassification.from_pretrained(classifiers / arch).eval()
    enc = tokenizer(["the cat sees a dog .", "a bird"], padding=True, return_tensors="pt")
    hidden, weight, bias = seam.classifier_seam(model, enc["input_ids"], enc["attention_mask"], CLASSES)
    assert hidden.shape == (2, enc["input_ids"].shape[1], 32)
    ours = F.linear(hidden[:, 0], weight, bias)
    theirs = model(**enc).logits
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=0) or float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())


def test_a_classifier_whose_logits_are_not_head_of_pooled_is_refused(classifiers, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(classifiers / "bert")
    model.classifier.register_forward_hook(lambda m, a, out: out * 2)  # a logit scale after the head
    with pytest.raises(NotImplementedError, match="not its classification head applied"):
        seam.check_classifier(model, tokenizer.pad_token_id, "teacher.path")


# --- loss through the loop's batch_loss vs a naive reference ------------------------------------------------------

@pytest.mark.parametrize("arch,objective", [("bert", "0.5*ce + 0.5*fkl"), ("llama", "0.3*ce + 0.7*rkl")])
def test_classifier_loss_value_and_gradient_match_a_naive_reference(tmp_path, classifiers, labelled_jsonl, arch, objective):
    """train.batch_loss (seam → fused loss, V = num_labels, one position per text) equals the sum over texts of
    w_ce·CE(student logits, label) + w·T²·D(teacher at T, student at T) on the models' own logits; same gradients."""
    T = 2.0
    cfg = run_config(tmp_path, classifiers / arch, labelled_jsonl, f"loss.objective={objective}", f"loss.temperature={T}")
    parts = load_parts(cfg, torch.device("cpu"))
    parts.student.eval()  # no dropout: the reference forward must see the same network
    batch = first_batch(cfg, parts)
    out = batch_loss(parts, seams(parts), batch, cfg.objective(), 0)
    out.total.backward()
    ours = {n: p.grad.clone() for n, p in parts.student.named_parameters() if p.grad is not None}
    parts.student.zero_grad()

    y = batch["labels"][:, 1]
    s = parts.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        t = parts.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (w_ce, _), (w_kd, name) = [(float(x.split("*")[0]), x.split("*")[1]) for x in objective.split(" + ")]
    logq, logp = (s / T).log_softmax(-1), (t / T).log_softmax(-1)
    kd = (logp.exp() * (logp - logq)).sum() if name == "fkl" else (logq.exp() * (logq - logp)).sum()
    reference = w_ce * F.cross_entropy(s, y, reduction="sum") + w_kd * T * T * kd
    reference.backward()
    assert out.n_valid == len(y) == 6
    assert float(out.total) == pytest.approx(float(reference), rel=1e-5)
    assert_grads_close(ours, parts.student)


def test_lelp_loss_is_the_kd_of_the_teachers_subclass_logits(tmp_path, classifiers, labelled_jsonl):
    """With LELP the fused loss runs on V = C·S: the student's widened head against the teacher's pseudo-subclass
    logits (value and gradient vs the naive formula)."""
    cfg = run_config(tmp_path, classifiers / "bert", labelled_jsonl, "task.lelp_subclasses=2", "loss.objective=fkl")
    parts = load_parts(cfg, torch.device("cpu"))
    assert parts.vocab == 2 * CLASSES and seam.classifier_head(parts.student).out_features == 2 * CLASSES
    parts.student.eval()
    batch = first_batch(cfg, parts)
    out = batch_loss(parts, seams(parts), batch, cfg.objective(), 0)
    out.total.backward()
    ours = parts.student.classifier.weight.grad.clone()
    parts.student.zero_grad()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s = parts.student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        h, w, b = seam.pooled_and_head(parts.teacher, ids, mask)
        z = parts.encoder.subclasses.subclass_logits(h, w, b)
    logp = z.log_softmax(-1)
    reference = (logp.exp() * (logp - s.log_softmax(-1))).sum()
    reference.backward()
    assert float(out.total) == pytest.approx(float(reference), rel=1e-5)
    assert float((ours - parts.student.classifier.weight.grad).norm()) <= 1e-4 * float(ours.norm())


# --- LELP pieces, exact numbers -----------------------------------------------------------------------------------

def lelp_toy():
    """Head rows ±e1 (its row space is e1; the null space e2, e3). Class 0's vectors vary along e2 (±2) and e3 (±1)
    around mean (·, 1, 0); class 1's along e3 (±3) and e2 (±1) around (·, 0, 0)."""
    weight = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]])
    c0 = torch.tensor([[5.0, 3, 0], [7.0, -1, 0], [5.0, 1, 1], [9.0, 1, -1]])
    c1 = torch.tensor([[-2.0, 0, 3], [-4.0, 0, -3], [-3.0, 1, 0], [-1.0, -1, 0]])
    return torch.cat([c0, c1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), weight


def test_lelp_fit_finds_each_classes_principal_directions_in_the_heads_null_space():
    h, labels, weight = lelp_toy()
    fit = lelp.fit(h, labels, weight, per_class=2)
    expected_dirs = torch.tensor([[[0.0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0]]])
    assert torch.allclose(fit.directions.abs(), expected_dirs, atol=1e-6)  # unit vectors: entries exactly 0 or 1
    assert (fit.directions.sum(-1) > 0).all()  # sign rule: largest entry positive
    assert torch.allclose(fit.means, torch.tensor([[0.0, 1, 0], [0, 0, 0]]), atol=1e-6)
    # std along a direction: sqrt(Σ x² / (n − 1)): class 0 e2: (4 + 4) / 3; e3: (1 + 1) / 3; class 1 e3: 18/3, e2: 2/3
    expected_std = torch.tensor([[math.sqrt(8 / 3), math.sqrt(2 / 3)], [math.sqrt(6), math.sqrt(2 / 3)]])
    assert torch.allclose(fit.stds, expected_std, rtol=1e-5)


def test_lelp_subclass_logits_exact_and_their_class_marginal_is_the_teachers():
    h, labels, weight = lelp_toy()
    fit = lelp.fit(h, labels, weight, per_class=2)
    bias = torch.tensor([0.5, -0.5])
    x = torch.tensor([[2.0, 3.0, 1.0]])
    z = fit.subclass_logits(x, weight, bias)
    # class logits 2.5, −2.5; class 0 coordinates ((3 − 1)/√(8/3), 1/√(2/3)); class 1 (1/√6, 3/√(2/3))
    u0, u1 = torch.tensor([2 / math.sqrt(8 / 3), 1 / math.sqrt(2 / 3)]), torch.tensor([1 / math.sqrt(6), 3 / math.sqrt(2 / 3)])
    expected = torch.cat([2.5 + u0.log_softmax(0), -2.5 + u1.log_softmax(0)])
    assert torch.allclose(z[0], expected, rtol=1e-5)
    marginal = z.reshape(1, 2, 2).logsumexp(-1).log_softmax(-1)
    assert torch.allclose(lelp.class_logprobs(z, 2), marginal)
    assert torch.allclose(marginal, (x @ weight.T + bias).log_softmax(-1), rtol=1e-5)


def test_lelp_class_logprobs_sum_subclass_probabilities():
    z = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])  # subclass probs ∝ 1, 3, 1, 1
    assert torch.allclose(lelp.class_logprobs(z, 2).exp(), torch.tensor([[4 / 6, 2 / 6]]), rtol=1e-6)


def test_lelp_widened_head_copies_class_rows_and_keeps_the_class_distribution():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    wide = lelp.widen_head(head, 2)
    assert torch.equal(wide.weight, head.weight[[0, 0, 1, 1, 2, 2]]) and torch.equal(wide.bias, head.bias[[0, 0, 1, 1, 2, 2]])
    x = torch.randn(5, 4)
    assert torch.allclose(lelp.class_logprobs(wide(x), 2), head(x).log_softmax(-1), rtol=1e-5)


def test_lelp_split_round_trips_its_bytes_and_knows_the_head_it_was_fitted_for():
    h, labels, weight = lelp_toy()
    fit = lelp.fit(h, labels, weight, per_class=2)
    back = lelp.Subclasses.from_bytes(fit.to_bytes())
    assert all(torch.equal(getattr(back, k), getattr(fit, k)) for k in FIELDS)
    rounded = 3 * weight + torch.tensor([[0, 1e-3, 0], [0, 0, -1e-3]])  # the same head, scaled and rounded
    assert back.fits(weight, 2) and back.fits(rounded, 2)
    assert not back.fits(torch.tensor([[0.0, 1, 0], [0, -1, 0]]), 2)  # another head: e2 is not in span(e1)
    assert not back.fits(weight, 3) and not back.fits(torch.cat([weight, weight[:1]]), 2)  # other S, other C


def test_lelp_refuses_a_class_with_too_few_texts():
    h, labels, weight = lelp_toy()
    with pytest.raises(ValueError, match="class 0 has 4 training texts; LELP needs more than 4"):
        lelp.fit(h, labels, weight, per_class=4)


def test_lelp_refuses_a_class_whose_vectors_span_too_few_directions():
    h, labels, weight = lelp_toy()
    h[:4, 2] = 0.0  # class 0 now varies along e2 only
    with pytest.raises(ValueError, match="class 0's teacher vectors span fewer than 2"):
        lelp.fit(h, labels, weight, per_class=2)


# --- data and config errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("record,message", [
    ({"text": "the cat", "label": 3}, "labelled.jsonl:2: label 3 is out of range for num_labels=3"),
    ({"text": "the cat", "label": -1}, "labelled.jsonl:2: label -1 is out of range"),
    ({"text": "the cat", "label": "POSITIVE"}, "labelled.jsonl:2: label 'POSITIVE' is not one of the teacher's classes"),
    ({"text": "the cat", "label": 1.0}, "labelled.jsonl:2: 'label' must be a class index or a class name, got float"),
    ({"text": "the cat", "label": True}, "labelled.jsonl:2: 'label' must be a class index or a class name, got bool"),
    ({"text": "the cat"}, "labelled.jsonl:2: a sequence_classification record needs 'label'"),
    ({"text": 5, "label": 0}, "labelled.jsonl:2: 'text' must be a string"),
])
def test_bad_classification_records_are_refused_with_file_and_line(tmp_path, classifiers, record, message):
    path = tmp_path / "labelled.jsonl"
    path.write_text(json.dumps({"text": "a dog", "label": 0}) + "\n" + json.dumps(record) + "\n"
                    + json.dumps({"text": "a cow", "label": 1}) + "\n")
    cfg = run_config(tmp_path, classifiers / "bert", path, f"data.validation={path}")
    from potstill.models import load_tokenizer

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_examples(cfg, load_tokenizer(str(classifiers / "bert")))


def test_class_names_from_the_teachers_label2id_are_accepted(tmp_path, classifiers, tokenizer):
    path = tmp_path / "named.jsonl"
    path.write_text("".join(json.dumps({"text": "the big dog", "label": f"LABEL_{i}"}) + "\n" for i in range(3)))
    cfg = run_config(tmp_path, classifiers / "bert", path, f"data.validation={path}")
    train, _ = load_examples(cfg, tokenizer)
    assert [e.labels[1] for e in train] == [0, 1, 2] and all(l == -100 for e in train for i, l in enumerate(e.labels) if i != 1)


def test_num_labels_must_match_between_teacher_and_student(tmp_path, classifiers, labelled_jsonl):
    cfg = RunConfig.from_yaml(None, [f"teacher.path={classifiers / 'bert'}", f"data.train={labelled_jsonl}",
                                     "task.kind=sequence_classification", "train.report_to=none",
                                     "student.config={model_type: bert, hidden_size: 16, num_hidden_layers: 1, "
                                     "num_attention_heads: 2, intermediate_size: 32, num_labels: 2}"])
    with pytest.raises(ValueError, match="num_labels differ: teacher 3, student 2"):
        load_parts(cfg, torch.device("cpu"))


@pytest.mark.parametrize("overrides,message", [
    (["task.kind=regression"], "task.kind='regression': use causal_lm, sequence_classification, sentence_embedding"),
    (["task.lelp_subclasses=1"], "task.lelp_subclasses must be 0 \\(off\\) or ≥ 2, got 1"),
    (["task.kind=causal_lm", "task.lelp_subclasses=2"], "task.lelp_subclasses is an option of task.kind=sequence_classification"),
    (["task.lelp_subclasses=2", "loss.objective=0.5*ce + 0.5*fkl"], "label terms \\(ce\\) do not apply"),
    (["task.pooling=max"], "task.pooling='max': use mean or cls"),
    (["task.kind=sentence_embedding", "task.embedding_objective=cosine + kl"], "'kl' is not a term"),
    (["task.kind=sentence_embedding", "task.embedding_objective=0*cosine"], "weights must be > 0"),
    (["task.kind=sentence_embedding", "task.embedding_objective=cosine + 2*cosine"], "a term appears twice"),
    (["task.kind=sentence_embedding", "loss.objective=rkl"], "takes its objective from task.embedding_objective"),
    (["data.packing=true"], "data.packing is not supported with task.kind=sequence_classification"),
    (["teacher.cache=/tmp/x"], "teacher.cache is not supported with task.kind=sequence_classification"),
    (["student.lora.r=4"], "student.lora.r is not supported with task.kind=sequence_classification"),
    (["data.regime=onpolicy"], "data.regime is not supported with task.kind=sequence_classification"),
])
def test_bad_task_settings_are_refused_at_load(tmp_path, labelled_jsonl, overrides, message):
    base = ["teacher.path=/x", "student.init_from_teacher_layers=1", f"data.train={labelled_jsonl}",
            "task.kind=sequence_classification"]
    with pytest.raises(ValueError, match=message):
        RunConfig.from_yaml(None, base + overrides)


def test_an_encoder_run_needs_a_teacher_path(labelled_jsonl):
    with pytest.raises(ValueError, match="task.kind=sentence_embedding needs teacher.path"):
        RunConfig.from_yaml(None, [f"data.train={labelled_jsonl}", "task.kind=sentence_embedding",
                                   "student.config={model_type: bert}"])


# --- whole runs ---------------------------------------------------------------------------------------------------

def test_classifier_run_trains_evaluates_and_saves_a_loadable_classifier(tmp_path, classifiers, labelled_jsonl):
    cfg = run_config(tmp_path, classifiers / "bert", labelled_jsonl, "loss.objective=0.5*ce + 0.5*fkl",
                     "train.eval_every=2", "train.lr=1e-3")
    result = distill(cfg, progress=False)
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"accuracy", "teacher_accuracy", "agreement", "kl_teacher_student", "student_ce"} <= set(evals[-1])
    assert all(r["tokens"] == 6 for r in rows if r["kind"] == "train")  # one position per text
    final = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert final.config.num_hidden_layers == 1 and final.config.num_labels == CLASSES
    assert (result.run_dir / "report.md").exists()


def test_lelp_run_exports_a_subclass_head_with_named_subclasses(tmp_path, classifiers, labelled_jsonl):
    cfg = run_config(tmp_path, classifiers / "bert", labelled_jsonl, "task.lelp_subclasses=2", "loss.objective=fkl",
                     "loss.temperature=2")
    result = distill(cfg, progress=False)
    final = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert final.config.num_labels == 2 * CLASSES
    assert final.config.id2label[3] == "LABEL_1/1"
    assert 0 <= result.metrics["agreement"] <= 1


def lelp_run(tmp_path, classifiers, labelled_jsonl, *overrides):
    cfg = run_config(tmp_path, classifiers / "bert", labelled_jsonl, "task.lelp_subclasses=2", "loss.objective=fkl",
                     "train.max_steps=2", "train.lr=1e-3", *overrides)
    return cfg, distill(cfg, progress=False)


def from_final(cfg, final, *overrides):
    return RunConfig.from_yaml(None, [f"{k}={v}" for k, v in (("teacher.path", cfg.teacher.path),
                                                              ("data.train", cfg.data.train))] +
                               ["task.kind=sequence_classification", "loss.objective=fkl", "data.max_length=32",
                                "train.batch_size=6", "train.report_to=none", f"student.path={final}", *overrides])


def test_eval_of_an_lelp_run_gives_its_last_in_run_metrics(tmp_path, classifiers, labelled_jsonl):
    """`potstill eval <run>` reloads final/ (a C·S head) with the run's config: no second widening, no refusal, and
    the metrics of the run's last evaluation (same held-out texts, same student, same teacher)."""
    from potstill.evaluate_run import evaluate_path

    _, result = lelp_run(tmp_path, classifiers, labelled_jsonl, f"data.validation={labelled_jsonl}")
    assert (result.final_dir / "potstill" / lelp.FILE_NAME).exists()
    metrics = evaluate_path(result.run_dir)
    assert metrics["examples"] >= 64 and 0 < metrics["kl_teacher_student"]
    for key in ("accuracy", "teacher_accuracy", "agreement", "kl_teacher_student", "student_ce", "examples"):
        assert metrics[key] == pytest.approx(result.metrics[key], rel=1e-5), key
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["source"] == "potstill eval" and rows[-1]["step"] == 2


def test_an_exported_lelp_student_reloads_the_subclasses_it_was_trained_on(tmp_path, classifiers, labelled_jsonl):
    """student.path=final/ of an LELP run: the head keeps its C·S rows and the split is final/potstill/'s, not a refit
    (the file is edited here, so a refit would not reproduce it)."""
    cfg, result = lelp_run(tmp_path, classifiers, labelled_jsonl)
    file = result.final_dir / "potstill" / lelp.FILE_NAME
    fitted = load_parts(cfg, torch.device("cpu")).encoder.subclasses
    saved = lelp.Subclasses.from_bytes(file.read_bytes())
    assert all(torch.equal(getattr(saved, k), getattr(fitted, k)) for k in FIELDS)
    saved.means += 1.0
    file.write_bytes(saved.to_bytes())
    parts = load_parts(from_final(cfg, result.final_dir, "task.lelp_subclasses=2"), torch.device("cpu"))
    assert parts.vocab == 2 * CLASSES and seam.classifier_head(parts.student).out_features == 2 * CLASSES
    assert parts.encoder.num_labels == CLASSES and torch.equal(parts.encoder.subclasses.means, saved.means)
    exported = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert parts.student.config.id2label == exported.config.id2label


def test_an_exported_lelp_student_without_its_split_or_for_another_teacher_is_refitted(tmp_path, classifiers,
                                                                                         labelled_jsonl):
    cfg, result = lelp_run(tmp_path, classifiers, labelled_jsonl)
    fitted = load_parts(cfg, torch.device("cpu")).encoder.subclasses
    file = result.final_dir / "potstill" / lelp.FILE_NAME
    other = lelp.Subclasses.from_bytes(file.read_bytes())
    other.q = torch.linalg.qr(torch.randn(other.q.shape, generator=torch.Generator().manual_seed(0)))[0]
    file.write_bytes(other.to_bytes())  # a split whose row space is not this teacher's head
    for _ in range(2):
        parts = load_parts(from_final(cfg, result.final_dir, "task.lelp_subclasses=2"), torch.device("cpu"))
        assert all(torch.equal(getattr(parts.encoder.subclasses, k), getattr(fitted, k)) for k in FIELDS)
        assert seam.classifier_head(parts.student).out_features == 2 * CLASSES
        file.unlink(missing_ok=True)  # then: no split saved at all


def test_continuing_from_an_exported_lelp_student_trains_the_same_head(tmp_path, classifiers, labelled_jsonl):
    cfg, result = lelp_run(tmp_path / "first", classifiers, labelled_jsonl)
    cont = from_final(cfg, result.final_dir, "task.lelp_subclasses=2", "train.max_steps=2", "train.lr=1e-3",
                      f"out_dir={tmp_path / 'second'}")
    again = distill(cont, progress=False)
    final = AutoModelForSequenceClassification.from_pretrained(again.final_dir)
    assert final.config.num_labels == 2 * CLASSES and final.config.id2label[3] == "LABEL_1/1"
    assert (again.final_dir / "potstill" / lelp.FILE_NAME).read_bytes() == \
        (result.final_dir / "potstill" / lelp.FILE_NAME).read_bytes()
    before = AutoModelForSequenceClassification.from_pretrained(result.final_dir).classifier.weight
    assert not torch.equal(final.classifier.weight, before)  # it trained


@pytest.mark.parametrize("overrides,message", [
    (["task.lelp_subclasses=3"], "num_labels differ: teacher 3, student 6"),  # 6 rows are not 3 × 3 subclasses
    (["task.lelp_subclasses=0"], "num_labels differ: teacher 3, student 6"),  # an LELP head without LELP
])
def test_a_head_that_is_not_this_lelp_split_is_refused(tmp_path, classifiers, labelled_jsonl, overrides, message):
    cfg, result = lelp_run(tmp_path, classifiers, labelled_jsonl)
    with pytest.raises(ValueError, match=message):
        load_parts(from_final(cfg, result.final_dir, *overrides), torch.device("cpu"))


def test_a_six_row_head_not_named_as_lelp_subclasses_is_refused(tmp_path, classifiers, labelled_jsonl, tokenizer):
    torch.manual_seed(0)
    path = tmp_path / "six"
    BertForSequenceClassification(bert_config(tokenizer, num_labels=2 * CLASSES)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = run_config(tmp_path, classifiers / "bert", labelled_jsonl, "task.lelp_subclasses=2", "loss.objective=fkl",
                     "student.init_from_teacher_layers=null", f"student.path={path}")
    with pytest.raises(ValueError, match="num_labels differ: teacher 3, student 6"):
        load_parts(cfg, torch.device("cpu"))


@pytest.mark.parametrize("id2label,expected", [
    ({0: "neg/0", 1: "neg/1", 2: "pos/0", 3: "pos/1"}, True),
    ({0: "0/0", 1: "0/1", 2: "1/0", 3: "1/1"}, True),
    ({0: "neg/0", 1: "pos/1", 2: "pos/0", 3: "pos/1"}, False),  # a class's rows named after two classes
    ({0: "neg/1", 1: "neg/0", 2: "pos/0", 3: "pos/1"}, False),  # subclasses out of order
    ({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2", 3: "LABEL_3"}, False),
    ({0: "neg/0", 1: "neg/1", 2: "pos/0"}, False),
])
def test_an_lelp_head_is_recognised_by_its_subclass_names(id2label, expected):
    assert lelp.is_subclass_head(id2label, 2, 2) is expected


def test_classifier_run_resumes_with_identical_losses(tmp_path, classifiers, labelled_jsonl):
    from conftest import simulate_crash

    args = ("loss.objective=0.5*ce + 0.5*fkl", "train.save_every=2", "train.log_every=1", "train.lr=1e-3")
    full = distill(run_config(tmp_path / "a", classifiers / "bert", labelled_jsonl, *args), progress=False)
    part = distill(run_config(tmp_path / "b", classifiers / "bert", labelled_jsonl, *args), progress=False)
    simulate_crash(part.run_dir, lost_checkpoint=4, logged_until=3)
    distill(run_config(tmp_path / "b", classifiers / "bert", labelled_jsonl, *args), resume=True, progress=False)

    def losses(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in l]

    assert losses(part.run_dir) == losses(full.run_dir) and len(losses(full.run_dir)) == 4


# --- sentence embeddings ------------------------------------------------------------------------------------------

def test_embedding_loss_value_and_gradient_match_a_naive_reference(tmp_path, classifiers, labelled_jsonl):
    """cosine + 0.5·mse + 2·relation over the micro-batch's pooled (mean, normalised) embeddings, as sums over texts."""
    fresh = ("student.init_from_teacher_layers=null", "student.config={model_type: bert, hidden_size: 32, "
             "num_hidden_layers: 1, num_attention_heads: 4, intermediate_size: 64}")  # far from the teacher: cos ≈ 0
    cfg = run_config(tmp_path, classifiers / "encoder", labelled_jsonl, "task.embedding_objective=cosine + 0.5*mse + 2*relation",
                     *fresh, kind="sentence_embedding")
    parts = load_parts(cfg, torch.device("cpu"))
    parts.student.eval()
    batch = first_batch(cfg, parts)
    from potstill.precision import FULL

    out = embedding_loss(seams(parts), batch, cfg.objective(), FULL)
    out.total.backward()
    ours = {n: p.grad.clone() for n, p in parts.student.named_parameters() if p.grad is not None}
    parts.student.zero_grad()

    def embed(model):
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    s = embed(parts.student)
    with torch.no_grad():
        t = embed(parts.teacher)
    n = len(s)
    rel = sum(((s[i] @ s[j] / (s[i].norm() * s[j].norm()) - t[i] @ t[j] / (t[i].norm() * t[j].norm())) ** 2) / n
              for i in range(n) for j in range(n))
    reference = sum(1 - s[i] @ t[i] / (s[i].norm() * t[i].norm()) for i in range(n)) + 0.5 * ((s - t) ** 2).mean(-1).sum() + 2 * rel
    reference.backward()
    assert out.n_valid == n == 6
    assert float(out.total) == pytest.approx(float(reference), rel=1e-5)
    assert_grads_close(ours, parts.student)


def test_pointwise_embedding_terms_need_one_width(tmp_path, classifiers, labelled_jsonl):
    student = "student.config={model_type: bert, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}"
    base = [f"teacher.path={classifiers / 'encoder'}", f"data.train={labelled_jsonl}", "task.kind=sentence_embedding",
            student, "train.report_to=none"]
    with pytest.raises(ValueError, match="teacher's width is 32 and the student's 16"):
        load_parts(RunConfig.from_yaml(None, base), torch.device("cpu"))
    parts = load_parts(RunConfig.from_yaml(None, base + ["task.embedding_objective=relation"]), torch.device("cpu"))
    assert parts.student.config.hidden_size == 16


def test_embedding_run_reports_cosine_and_similarity_agreement(tmp_path, classifiers, labelled_jsonl):
    cfg = run_config(tmp_path, classifiers / "encoder", labelled_jsonl, "task.embedding_objective=cosine + relation",
                     "train.lr=1e-3", f"data.validation={labelled_jsonl}", "data.max_eval_examples=20",
                     kind="sentence_embedding")
    result = distill(cfg, progress=False)
    assert result.metrics["examples"] == 20
    assert 0 < result.metrics["cosine_agreement"] <= 1 and -1 <= result.metrics["similarity_spearman"] <= 1
    train = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
    assert train[-1]["loss"] == pytest.approx(train[-1]["term/cosine"] + train[-1]["term/relation"], rel=1e-6)
    assert train[-1]["tokens"] == 6  # one per text


def test_spearman_exact_with_and_without_ties():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8, rel=1e-12)
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(1.5 / math.sqrt(3), rel=1e-12)
