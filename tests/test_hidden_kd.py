"""Hidden-state KD in the one loop: projections, the layer map, the composed loss through a real train_step against a
naive reference written from the definitions, saving and exact resume, every bad input, an end-to-end run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR

import potstill
from potstill import runtime
from potstill.assemble import load_examples, load_parts
from potstill.config import RunConfig
from potstill.data.batches import Batcher
from potstill.hidden.layers import resolve_layer_map
from potstill.hidden.projections import Projections, build_projection
from potstill.train import train_step

from potstill.builtin import builtin_texts

from conftest import save_tiny_model, seams, simulate_crash


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory, tokenizer):
    """A 3-block, 48-wide Llama teacher and a 2-block, 32-wide Llama student (4 attention heads, 2 KV heads)."""
    root = tmp_path_factory.mktemp("hidden_models")
    return (save_tiny_model(root / "teacher", "llama", tokenizer, layers=3, hidden=48, seed=11),
            save_tiny_model(root / "student", "llama", tokenizer, layers=2, hidden=32, seed=12))


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    """prompt/completion records of different lengths: prompt positions are unlabelled and rows are padded, so
    neither the label mask nor the attention mask is all ones."""
    rows = []
    for i, text in enumerate(builtin_texts("train", 120)):
        words = text.split()
        cut = 3 + i % 3
        rows.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut: cut + 6 + (7 * i) % 13])})
    path = tmp_path_factory.mktemp("hidden_data") / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(tmp_path, pair, data, *overrides, **train):
    teacher, student = pair
    items = [f"teacher.path={teacher}", f"student.path={student}", f"data.train={data}", f"out_dir={tmp_path / 'run'}",
             "data.max_length=48", "data.max_eval_examples=8", "loss.chunk_size=40", "train.lr=0.01",
             "train.log_every=1", "eval.max_new_tokens=3", "device=cpu", *overrides]
    items += [f"train.{k}={v}" for k, v in train.items()]
    return RunConfig.from_yaml(None, items)


# ---- projections -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_width,teacher_width", [(32, 48), (48, 32), (40, 40)])
def test_orthogonal_projection_is_semi_orthogonal_before_and_after_training(student_width, teacher_width):
    proj = build_projection("orthogonal", student_width, teacher_width)
    opt = torch.optim.AdamW(proj.parameters(), lr=0.05, weight_decay=0.1)  # decay must not break the constraint
    for step in range(3):
        w = proj.weight
        assert w.shape == (teacher_width, student_width)
        # the wider side's Gram matrix is the identity: WᵀW = I (teacher wider), WWᵀ = I (teacher narrower)
        gram = w.T @ w if teacher_width >= student_width else w @ w.T
        eye = torch.eye(gram.shape[0])
        assert ((gram - eye).norm() / eye.norm()).item() < 1e-5, step
        loss = (proj(torch.randn(5, student_width)) - torch.randn(5, teacher_width)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_linear_and_identity_projections():
    assert build_projection("linear", 32, 48).weight.shape == (48, 32)
    assert build_projection("linear", 32, 48).bias is None
    x = torch.randn(3, 16)
    assert torch.equal(build_projection("none", 16, 16)(x), x)


def test_projection_init_uses_its_own_seed_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = Projections("linear", 2, 8, 12, seed=3)
    assert torch.equal(torch.rand(3), expected)
    b = Projections("linear", 2, 8, 12, seed=3)
    assert torch.equal(a.pairs[1].weight, b.pairs[1].weight)
    assert not torch.equal(a.pairs[0].weight, a.pairs[1].weight)


# ---- layer map ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs,student,teacher,expected", [
    (0, 2, 3, [(1, 1), (2, 3)]),  # default N = min(L_s, L_t): every student block, the last layers pair
    (1, 2, 3, [(2, 3)]),
    (4, 4, 12, [(1, 3), (2, 6), (3, 9), (4, 12)]),
    (3, 6, 4, [(2, 1), (4, 2), (6, 4)]),
])
def test_uniform_layer_map(pairs, student, teacher, expected):
    assert resolve_layer_map("uniform", pairs, student, teacher) == expected


def test_explicit_layer_map_is_taken_as_given():
    assert resolve_layer_map([[0, 0], [2, 3], [1, 3]], 0, 2, 3) == [(0, 0), (2, 3), (1, 3)]


# ---- the composed loss through a real train_step ----------------------------------------------------------------


class RecordingSGD(torch.optim.SGD):
    """lr 0: records each parameter's gradient as the train_step hands it to the optimizer."""

    def step(self, closure=None):
        self.grads = {id(p): p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None}


def naive_loss(parts, batch, objective_terms: str, hidden_cfg) -> torch.Tensor:
    """The whole composed loss from the definitions: full-logit forward passes, fkl/ce over the vocabulary, the
    hidden-state term over labelled positions and MiniLM relations as dense (B, R, T, T) softmaxes."""
    student, teacher, vocab = parts.student, parts.teacher, parts.vocab
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    valid = labels[:, 1:] != -100
    logq = F.log_softmax(s_out.logits[:, :-1, :vocab].float(), -1)
    logp = F.log_softmax(t_out.logits[:, :-1, :vocab].float(), -1)
    if objective_terms == "fkl":
        total = (logp.exp() * (logp - logq)).sum(-1)[valid].sum()
    else:  # ce
        total = -logq.gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0][valid].sum()
    if hidden_cfg.weight > 0:
        terms = []
        for k, (s, t) in enumerate(parts.hidden.layer_map):
            projected = s_out.hidden_states[s][:, :-1] @ parts.hidden.projections.pairs[k].weight.T
            target = t_out.hidden_states[t][:, :-1]
            if hidden_cfg.objective == "mse":
                per = ((projected - target) ** 2).mean(-1)
            else:
                per = 1 - (projected * target).sum(-1) / (projected.norm(dim=-1) * target.norm(dim=-1))
            terms.append(per[valid].sum())
        total = total + hidden_cfg.weight * sum(terms) / len(terms)
    r = hidden_cfg.attention_relations
    if r.weight > 0:
        heads, T = r.heads, ids.shape[1] - 1
        visible = (mask[:, None, None, :T].bool() & torch.ones(T, T, dtype=torch.bool).tril())  # (B, 1, T, T)
        rel = 0.0
        for x in r.relations:
            def qkv(model, out):  # block L's projection of its input (hidden state L-1 through the input norm)
                block = model.model.layers[-1]
                y = getattr(block.self_attn, f"{x}_proj")(block.input_layernorm(out.hidden_states[-2]))[:, :T]
                B, _, W = y.shape
                y = y.reshape(B, T, heads, W // heads).transpose(1, 2)
                return (y @ y.transpose(-1, -2) / math.sqrt(W // heads)).masked_fill(~visible, float("-inf"))

            with torch.no_grad():
                t_logp = qkv(teacher, t_out).log_softmax(-1)
            s_logp = qkv(student, s_out).log_softmax(-1)
            kl = (t_logp.exp() * (t_logp - s_logp)).masked_fill(~visible, 0).sum(-1)  # (B, R, T)
            rel = rel + kl.masked_fill(~valid[:, None, :], 0).sum()
        total = total + r.weight * rel / (heads * len(r.relations))
    return total / valid.sum()


@pytest.mark.parametrize("objective,hidden", [
    ("fkl", ["hidden.weight=0.7", "hidden.objective=mse", "hidden.projection=linear"]),
    ("fkl", ["hidden.weight=0.7", "hidden.objective=cosine", "hidden.projection=orthogonal", "hidden.pairs=1"]),
    ("ce", ["hidden.weight=1.5", "hidden.layers=[[0, 0], [2, 3]]", "hidden.attention_relations.weight=0.3",
            "hidden.attention_relations.heads=2"]),
    ("fkl", ["hidden.attention_relations.weight=2.0", "hidden.attention_relations.heads=4",
             "hidden.attention_relations.relations=[v, q]"]),
])
def test_train_step_value_and_gradients_match_the_naive_composed_loss(tmp_path, llama_pair, prompt_data, objective,
                                                                      hidden):
    cfg = make_config(tmp_path, llama_pair, prompt_data, f"loss.objective={objective}", *hidden, max_grad_norm=0)
    parts = load_parts(cfg, torch.device("cpu"))
    par = seams(parts)
    train, _ = load_examples(cfg, parts.tokenizer)
    batch = Batcher(train, 6, 0, parts.tokenizer.pad_token_id).next_batch()
    assert (batch["labels"][:, 1:] == -100).any() and (batch["attention_mask"] == 0).any()  # masks matter here
    params = [p for p in par.student.parameters() if p.requires_grad]
    opt = RecordingSGD(params, lr=0.0)
    stats, _, _ = train_step(parts, par, [batch], cfg.objective(), cfg, runtime.Runtime(torch.device("cpu")), opt,
                             LambdaLR(opt, lambda s: 1.0))
    reference = naive_loss(parts, batch, objective, cfg.hidden)
    expected = torch.autograd.grad(reference, params)
    assert stats["loss"] == pytest.approx(reference.item(), rel=1e-5)
    # the projections train with the student: in the seam's parameters, so in the optimizer
    projection_params = len(params) - sum(1 for p in parts.student.parameters() if p.requires_grad)
    assert projection_params == (len(parts.hidden.layer_map) if cfg.hidden.weight > 0 else 0)
    for p, want in zip(params, expected):
        got = opt.grads[id(p)]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-12)
    active = [k for k in ("hidden/states", "hidden/attention_relations") if k in stats]
    assert active == [k for k, on in (("hidden/states", cfg.hidden.weight > 0),
                                      ("hidden/attention_relations", cfg.hidden.attention_relations.weight > 0)) if on]


def test_gradient_checkpointing_keeps_hidden_and_relation_gradients(tmp_path, llama_pair, prompt_data):
    """The states and q/k/v outputs come out of checkpointed blocks (non-reentrant): same gradients as without."""
    grads = []
    for checkpointing in ("false", "true"):
        cfg = make_config(tmp_path, llama_pair, prompt_data, "hidden.weight=1", "hidden.attention_relations.weight=1",
                          "hidden.attention_relations.heads=2", max_grad_norm=0, gradient_checkpointing=checkpointing)
        parts = load_parts(cfg, torch.device("cpu"))
        from potstill import precision

        amp = precision.setup(cfg, torch.device("cpu"), parts.student, None)
        par = seams(parts)
        parts.student.train()
        train, _ = load_examples(cfg, parts.tokenizer)
        batch = Batcher(train, 4, 0, parts.tokenizer.pad_token_id).next_batch()
        opt = RecordingSGD([p for p in par.student.parameters()], lr=0.0)
        train_step(parts, par, [batch], cfg.objective(), cfg, runtime.Runtime(torch.device("cpu")), opt,
                   LambdaLR(opt, lambda s: 1.0), amp)
        grads.append([opt.grads[id(p)] for p in par.student.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


# ---- runs: saving, exact resume, end to end ----------------------------------------------------------------------


def metric_lines(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_end_to_end_run_learns_and_saves_projections_beside_the_student(tmp_path, llama_pair, prompt_data):
    cfg = make_config(tmp_path, llama_pair, prompt_data, "hidden.weight=1", "hidden.projection=orthogonal",
                      "hidden.attention_relations.weight=0.5", "hidden.attention_relations.heads=2",
                      max_steps=20, batch_size=8, eval_every=20, save_every=0)
    result = potstill.distill(cfg, progress=False)
    train = metric_lines(result.run_dir, "train")
    assert len(train) == 20
    first, last = (sum(r["hidden/states"] for r in rows) / 4 for rows in (train[:4], train[-4:]))
    assert last < 0.9 * first, (first, last)
    assert all(r["loss"] >= r["term/fkl"] for r in train)
    saved = load_file(result.final_dir / "potstill" / "hidden_projections.safetensors")
    assert sorted(saved) == ["pairs.0.weight", "pairs.1.weight"]
    for w in saved.values():  # teacher (48) wider than student (32): WᵀW = I
        assert w.shape == (48, 32)
        assert ((w.T @ w - torch.eye(32)).norm() / math.sqrt(32)).item() < 1e-5
    exported = load_file(result.final_dir / "model.safetensors")
    assert not any("projection" in k or k.startswith("pairs") for k in exported)
    assert json.loads((result.final_dir / "config.json").read_text())["num_hidden_layers"] == 2


def test_resume_restores_the_projections_exactly(tmp_path, llama_pair, prompt_data, tokenizer):
    """A dropout student, so the RNG stream matters too; losses after resuming are bit-identical and the final
    projections equal the uninterrupted run's."""
    dropout_student = save_tiny_model(tmp_path / "dropout_student", "llama", tokenizer, layers=2, hidden=32, seed=12,
                                      attention_dropout=0.5)
    cfg = make_config(tmp_path, (llama_pair[0], dropout_student), prompt_data, "hidden.weight=1",
                      "hidden.projection=orthogonal", "hidden.attention_relations.weight=0.5",
                      max_steps=6, batch_size=4, save_every=3, eval_every=0, keep_checkpoints=3)
    full = potstill.distill(cfg, progress=False)
    uninterrupted = metric_lines(full.run_dir, "train")
    projections = load_file(full.final_dir / "potstill" / "hidden_projections.safetensors")
    simulate_crash(full.run_dir, lost_checkpoint=6, logged_until=4)
    resumed = potstill.distill(cfg, resume=True, progress=False)
    again = metric_lines(resumed.run_dir, "train")
    assert [r["loss"] for r in again] == [r["loss"] for r in uninterrupted]
    assert [r["hidden/states"] for r in again] == [r["hidden/states"] for r in uninterrupted]
    after = load_file(resumed.final_dir / "potstill" / "hidden_projections.safetensors")
    assert all(torch.equal(after[k], projections[k]) for k in projections)


# ---- bad inputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["hidden.weight=-1"], "hidden.weight must be a finite number ≥ 0"),
    (["hidden.weight=1e400"], "hidden.weight must be a finite number ≥ 0"),
    (["hidden.objective=l2"], "hidden.objective='l2': use mse or cosine"),
    (["hidden.projection=conv"], "hidden.projection='conv': use linear, orthogonal or none"),
    (["hidden.layers=all"], "hidden.layers='all': use uniform or a list"),
    (["hidden.layers=[[1, 2], [3]]"], r"hidden.layers pair 1 \[3\]: expected \[student, teacher\]"),
    (["hidden.layers=[[1, -2]]"], r"hidden.layers pair 0 \[1, -2\]"),
    (["hidden.pairs=-1"], "hidden.pairs must be ≥ 0"),
    (["hidden.pairs=2", "hidden.layers=[[1, 2]]"], "hidden.pairs counts uniform pairs"),
    (["hidden.attention_relations.weight=-0.5"], "hidden.attention_relations.weight must be"),
    (["hidden.attention_relations.heads=0"], "hidden.attention_relations.heads must be ≥ 1"),
    (["hidden.attention_relations.layers=[0, 2]"], "hidden.attention_relations.layers=\\[0, 2\\]"),
    (["hidden.attention_relations.relations=[q, o]"], "hidden.attention_relations.relations="),
    (["hidden.attention_relations.relations=[q, q]"], "distinct q, k, v"),
    (["hidden.attention_relations.weight=1", "data.packing=true"], "hidden.attention_relations with data.packing"),
    (["hidden.weight=1", "teacher.cache=/some/cache"], "which teacher.cache does not hold: use a live teacher"),
    (["hidden.weight=1", "parallel.strategy=fsdp"], "hidden.\\* with parallel.strategy=fsdp is not supported"),
])
def test_bad_hidden_settings_are_refused_at_load(tmp_path, llama_pair, prompt_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, llama_pair, prompt_data, *overrides)


def test_hidden_kd_with_a_server_teacher_or_no_teacher_is_refused(tmp_path, llama_pair, prompt_data):
    with pytest.raises(ValueError, match="which teacher.server_url does not hold"):
        make_config(tmp_path, llama_pair, prompt_data, "hidden.weight=1", "teacher.server_url=http://127.0.0.1:1", "teacher.server_model=m",
                    "loss.objective=ce")
    with pytest.raises(ValueError, match="hidden.\\* distils a teacher's hidden states: set teacher.path"):
        RunConfig.from_yaml(None, [f"student.path={llama_pair[1]}", "loss.objective=ce", "hidden.weight=1"])


@pytest.mark.parametrize("overrides,message", [
    (["hidden.layers=[[1, 1], [3, 3]]"], r"hidden.layers pair 1 \[3, 3\]: student layer 3 is out of range \(the "
                                          r"student has 2 blocks: 0 = embeddings .. 2 = final state\)"),
    (["hidden.layers=[[2, 4]]"], r"teacher layer 4 is out of range \(the teacher has 3 blocks"),
    (["hidden.pairs=3"], r"hidden.pairs=3: at most 2 uniform pairs \(the student has 2 blocks, the teacher 3\)"),
    (["hidden.projection=none"], "hidden.projection=none needs equal widths, but the student's hidden size is 32 "
                                 "and the teacher's 48"),
    (["hidden.attention_relations.weight=1", "hidden.attention_relations.heads=3"],
     "hidden.attention_relations.heads=3 does not divide the student's q_proj width 32"),
    (["hidden.attention_relations.weight=1", "hidden.attention_relations.layers=[1, 4]"],
     r"teacher block 4 is out of range \(the teacher has 3 blocks, numbered 1..3\)"),
])
def test_bad_hidden_settings_for_the_loaded_models_are_refused_before_training(tmp_path, llama_pair, prompt_data,
                                                                                overrides, message):
    cfg = make_config(tmp_path, llama_pair, prompt_data, "hidden.weight=1", *overrides)
    with pytest.raises(ValueError, match=message):
        load_parts(cfg, torch.device("cpu"))


def test_attention_relations_need_separate_qkv_modules(tmp_path, model_dirs, prompt_data):
    cfg = make_config(tmp_path, (model_dirs["gpt2_teacher"], model_dirs["gpt2_student"]), prompt_data,
                      "hidden.attention_relations.weight=1")
    with pytest.raises(NotImplementedError, match=r"the student \(GPT2LMHeadModel\) has no q_proj, k_proj, v_proj "
                                                  "module in block 2"):
        load_parts(cfg, torch.device("cpu"))


def test_a_refused_hidden_run_leaves_nothing_behind(tmp_path, llama_pair, prompt_data):
    cfg = make_config(tmp_path, llama_pair, prompt_data, "hidden.weight=1", "hidden.layers=[[5, 1]]")
    with pytest.raises(ValueError, match="student layer 5 is out of range"):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()


# ---- data parallelism --------------------------------------------------------------------------------------------


def test_ddp_run_with_hidden_state_kd_equals_one_process(tmp_path_factory, tokenizer):
    """The projections sit inside the DDP-wrapped seam: two gloo ranks follow the one-process trajectory (loss and
    the gradient norm, which includes the projections' gradients) and rank 0 saves them."""
    from test_distributed import assert_same_trajectory, in_process, rows, torchrun

    root = tmp_path_factory.mktemp("hidden_ddp")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts("train", 40)))
    setup = {"root": root, "data": data,
             "teacher": save_tiny_model(root / "teacher", "llama", tokenizer, layers=3, hidden=48, seed=1),
             "student": save_tiny_model(root / "student", "llama", tokenizer, layers=2, hidden=32, seed=2)}
    extra = ("hidden.weight=1", "hidden.projection=orthogonal", "hidden.attention_relations.weight=0.5",
             "hidden.attention_relations.heads=2")
    one = in_process(setup, root / "one-rank", "train.batch_size=4", *extra)
    two = torchrun(setup, root / "ddp", "train.batch_size=2", *extra)
    assert_same_trajectory(two, one)
    for a, b in zip(rows(two), rows(one)):
        assert a["hidden/states"] == pytest.approx(b["hidden/states"], rel=1e-5)
        assert a["hidden/attention_relations"] == pytest.approx(b["hidden/attention_relations"], rel=1e-5)
    assert (two / "final" / "potstill" / "hidden_projections.safetensors").exists()


def test_hidden_kd_refuses_records_with_privileged_context(tmp_path, llama_pair):
    from conftest import builtin_prompt_completion_jsonl

    data = builtin_prompt_completion_jsonl(tmp_path / "privileged.jsonl", 20, 4, 6, privileged=True)
    cfg = make_config(tmp_path, llama_pair, data, "hidden.weight=1")
    with pytest.raises(ValueError, match=r"\d+ training records carry privileged_context: the teacher would read other"):
        potstill.distill(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_packed_batch_gives_the_padded_batchs_hidden_state_loss_and_gradients(tmp_path, llama_pair, prompt_data):
    """data.packing changes the layout, not the hidden-state term: same sum and gradients as the padded batch."""
    from potstill.losses.reduce import count_valid_tokens
    from potstill.train import batch_loss, shifted

    cfg = make_config(tmp_path, llama_pair, prompt_data, "hidden.weight=1", "data.packing=true")
    parts = load_parts(cfg, torch.device("cpu"))
    examples, _ = load_examples(cfg, parts.tokenizer)
    pad = parts.tokenizer.pad_token_id
    padded = Batcher(examples, 8, 0, pad).next_batch()
    packed = Batcher(examples, 8, 0, pad, pack_length=96).next_batch()
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    par = seams(parts)
    results = []
    for batch in (padded, packed):
        par.student.zero_grad(set_to_none=True)
        out = batch_loss(parts, par, batch, cfg.objective(), chunk_size=40)
        out.total.backward()
        results.append((out.total.item(), parts.hidden.step_metrics(lambda x: x, count_valid_tokens([shifted(batch)])),
                        [p.grad.clone() for p in par.student.parameters()]))
    (total_a, metrics_a, grads_a), (total_b, metrics_b, grads_b) = results
    assert total_b == pytest.approx(total_a, rel=1e-5)
    assert metrics_b["hidden/states"] == pytest.approx(metrics_a["hidden/states"], rel=1e-5)
    for a, b in zip(grads_a, grads_b):
        assert float((b - a).norm() / a.norm()) < 1e-5
