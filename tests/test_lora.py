"""LoRA students (student.lora, through peft): what trains, what the fused loss sees, checkpoints, final/."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import potstill
from conftest import save_tiny_model, seams
from potstill import lora, runtime
from potstill.assemble import load_examples, load_parts
from potstill.cache.run import build_from_config
from potstill.config import RunConfig
from potstill.data.batches import Batcher, collate
from potstill.evaluate_run import evaluate_path
from potstill.losses.chunked import fused_loss
from potstill.models import check_plain_head, hidden_states, output_head
from potstill.train import make_optimizer, shifted, train_step


@pytest.fixture(scope="module")
def llama_student(tmp_path_factory, tokenizer):
    """Untied Llama with its tokenizer (a saved qwen2 directory would reload the tokenizer as Qwen2Tokenizer)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama_student", "llama", tokenizer, seed=6)


def lora_config(tmp_path, model_dirs, data, student, *extra):
    return RunConfig.from_yaml(None, [
        f"teacher.path={model_dirs['llama_teacher']}", f"student.path={student}",
        f"data.train={data}", f"out_dir={tmp_path / 'run'}", "data.max_length=48", "data.max_eval_examples=8",
        "data.max_train_examples=64", "loss.chunk_size=50", "train.lr=0.01", "train.batch_size=4", "train.log_every=1",
        "train.eval_every=0", "train.report_to=none", "eval.max_new_tokens=3", "device=cpu", "student.lora.r=4", *extra])


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_adapters_train_and_base_weights_stay_bit_identical(tmp_path, model_dirs, text_jsonl, llama_student):
    cfg = lora_config(tmp_path, model_dirs, text_jsonl, llama_student)
    rt = runtime.setup("cpu")
    parts = load_parts(cfg, rt.device)
    train, _ = load_examples(cfg, parts.tokenizer)
    base = {n: p.detach().clone() for n, p in parts.student.named_parameters() if "lora_" not in n}
    before = lora_params(parts.student)
    trainable = [n for n, p in parts.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    optimizer, scheduler = make_optimizer(cfg, parts.student)
    batcher = Batcher(train, 4, 0, parts.tokenizer.pad_token_id)
    par = seams(parts)
    for _ in range(3):
        train_step(parts, par, [batcher.next_batch()], cfg.objective(), cfg, rt, optimizer, scheduler)
    after = lora_params(parts.student)
    assert all(not torch.equal(before[n], after[n]) for n in before), "every adapter matrix (A and B) trains"
    assert all(torch.equal(p, base[n]) for n, p in parts.student.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("extra", [[], ["student.lora.target_modules=[q_proj, v_proj, lm_head]"],
                                   ["student.lora.modules_to_save=[lm_head]"]])
def test_merged_final_loads_without_peft_and_matches_the_adapted_model(tmp_path, model_dirs, text_jsonl, llama_student, extra):
    cfg = lora_config(tmp_path, model_dirs, text_jsonl, llama_student, "train.max_steps=4", "student.lora.save_adapter=true", *extra)
    result = potstill.distill(cfg, progress=False)
    final = result.final_dir
    assert not (final / "adapter_config.json").exists() and (final / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)  # a plain transformers model, no peft involved
    assert not lora.is_adapted(merged)
    adapted = load_parts(cfg, torch.device("cpu")).student  # fresh adapters on the same base ...
    lora.load_adapters(final / "adapter", adapted)  # ... given the trained ones
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2]])
    adapted.eval()
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(llama_student)(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(got, untrained, rtol=1e-3, atol=1e-3 * want.abs().max().item())  # training moved it
    # `potstill eval` on the run evaluates final/ as a plain model and agrees with the run's own last evaluation
    last_eval = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert evaluate_path(result.run_dir)["student_ce"] == pytest.approx(last_eval["student_ce"], rel=1e-5)


def test_lora_head_gradients_match_autograd_through_the_dense_model(tmp_path, tokenizer):
    """An adapted lm_head: the fused loss projects with its effective weight W + s·B·A; the gradients of A and B
    (head and body adapters) equal autograd through the model's own forward and a naive label CE."""
    student = save_tiny_model(tmp_path / "untied", "llama", tokenizer, seed=7)
    settings = RunConfig.from_dict({"student": {"path": str(student), "lora": {
        "r": 4, "alpha": 8, "target_modules": ["q_proj", "lm_head"]}}}, check_run=False).student.lora
    torch.manual_seed(0)
    model = lora.adapt(AutoModelForCausalLM.from_pretrained(student), settings)
    with torch.no_grad():  # B starts at zero, which would make every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    check_plain_head(model)  # the effective head reproduces the adapted model's logits
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    objective = RunConfig.from_dict({"loss": {"objective": "ce"}}, check_run=False).objective()

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    h = hidden_states(model, ids, batch["attention_mask"])[:, :-1]
    fused = grads(fused_loss(h, *output_head(model), shifted(batch), objective, None, chunk_size=5).total)
    logits = model(input_ids=ids).logits[:, :-1]
    naive = grads(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted(batch).reshape(-1), reduction="sum"))
    assert any("lm_head.lora_A" in n for n in fused) and fused.keys() == naive.keys()
    for name in fused:
        scale = naive[name].abs().max()
        assert torch.allclose(fused[name], naive[name], rtol=1e-5, atol=1e-5 * scale), name


def test_resume_restores_the_adapters_exactly(tmp_path, model_dirs, text_jsonl, dropout_student):
    """A dropout student with adapter dropout: the losses depend on the adapters and on the torch RNG stream."""
    cfg = lora_config(tmp_path, model_dirs, text_jsonl, dropout_student, "train.max_steps=8", "train.save_every=4",
                      "train.keep_checkpoints=3", "student.lora.dropout=0.1")
    full = potstill.distill(cfg, progress=False)
    losses = [r["loss"] for r in map(json.loads, (full.run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    checkpoint = full.run_dir / "checkpoints" / "step-0000004"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    shutil.rmtree(full.run_dir / "checkpoints" / "step-0000008")
    shutil.rmtree(full.run_dir / "final")
    resumed = potstill.distill(cfg, resume=True, progress=False)
    again = [r["loss"] for r in map(json.loads, (resumed.run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert again == losses  # bit-identical


def test_lora_composes_with_a_cache_and_teacher_layers(tmp_path, model_dirs, text_jsonl, llama_student):
    cache = tmp_path / "cache"
    base = lora_config(tmp_path, model_dirs, text_jsonl, llama_student, f"teacher.cache={cache}", "cache.mode=topk", "cache.k=4",
                       "cache.shard_size=32")
    build_from_config(base, progress=False)
    cfg = lora_config(tmp_path, model_dirs, text_jsonl, llama_student, f"teacher.cache={cache}", "student.path=",
                      "student.init_from_teacher_layers=2", "train.max_steps=3")
    result = potstill.distill(cfg, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert merged.config.num_hidden_layers == 2 and "teacher_ce" not in result.metrics  # the cache supplied the signal


@pytest.mark.parametrize("override,message", [
    ("student.lora.r=-1", "student.lora.r must be ≥ 0"),
    ("student.lora.dropout=1", r"student.lora.dropout must be in \[0, 1\)"),
    ("student.lora.alpha=0", "student.lora.alpha must be > 0"),
    ("student.lora.target_modules=[]", "student.lora.target_modules is empty"),
    ("student.lora.rank=4", "unknown config key 'student.lora.rank'"),
])
def test_bad_lora_settings_fail_at_config_load(tmp_path, model_dirs, text_jsonl, llama_student, override, message):
    with pytest.raises(ValueError, match=message) as err:
        lora_config(tmp_path, model_dirs, text_jsonl, llama_student, override)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["student.lora.target_modules=[q_projx]"], r"no module .q_projx.. Did you mean .q_proj.\?.*: .*k_proj.*lm_head"),
    (["student.lora.modules_to_save=[head]"], "student.lora.modules_to_save: the student has no module 'head'"),
    (["student.lora.target_modules=[lm_head]"], "'lm_head' shares its weight with embed_tokens"),
    (["student.lora.target_modules=[q_proj, lm_head]", "student.lora.dropout=0.1"], "dropout > 0 with lm_head"),
])
def test_bad_lora_modules_fail_before_training(tmp_path, model_dirs, text_jsonl, tokenizer, overrides, message):
    tied = "lm_head'" in message and "shares" in message
    student = save_tiny_model(tmp_path / "student", "llama", tokenizer, seed=8, tie_word_embeddings=tied)
    cfg = lora_config(tmp_path, model_dirs, text_jsonl, student, *overrides)
    with pytest.raises(ValueError, match=message) as err:
        potstill.distill(cfg, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory was created
