"""The draft recipes (configs/draft-*.yaml) run end to end at a tiny scale on the built-in default, log the
draft's acceptance at every evaluation, and their drafts serve the built-in teacher in HF assisted generation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from potstill.config import RunConfig
from potstill.models import load_causal_lm, load_tokenizer, resolve_model_path
from potstill.speculative.compat import check_draft, configure_hf_assistant
from potstill.train import distill
from tests.test_data_config import CONFIG_DIR

RECIPES = ("ce", "kd", "distillspec", "adaspec")  # kd before adaspec: its final/ is adaspec's reference
TINY = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=2", "train.log_every=1", "train.report_to=none",
        "data.max_train_examples=32", "data.max_eval_examples=8", "eval.batch_size=8", "eval.max_new_tokens=4",
        "onpolicy.max_new_tokens=8", "device=cpu"]


def recipe(name: str) -> Path:
    return CONFIG_DIR / f"draft-{name}.yaml"


def tiny_overrides(name: str, root: Path) -> list[str]:
    extra = [f"out_dir={root / name}"]
    if name == "adaspec":  # the two-step recipe: the reference is the kd run's final/
        extra.append(f"loss.reference={root / 'kd' / 'final'}")
    if name == "distillspec":  # every step on-policy, so these 3 steps exercise the rollouts (the recipe mixes 1:1)
        extra.append("onpolicy.lam=1")
    return TINY + extra


@pytest.fixture(scope="module")
def draft_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafts")
    return {name: distill(RunConfig.from_yaml(recipe(name), tiny_overrides(name, root)), progress=False).run_dir
            for name in RECIPES}


def test_draft_recipes_spend_one_budget_on_one_draft():
    cfgs = {name: RunConfig.from_yaml(recipe(name)) for name in RECIPES}
    budget = {(c.train.max_steps, c.train.batch_size, c.train.grad_accum, c.train.lr, c.data.train, c.data.max_length,
               c.data.max_train_examples, c.teacher.path, c.student.init_from_teacher_layers) for c in cfgs.values()}
    assert budget == {(300, 16, 1, 0.001, "builtin", 128, 4000, "builtin", 1)}
    assert {n: c.loss.objective for n, c in cfgs.items()} == {"ce": "ce", "kd": "fkl", "distillspec": "tvd", "adaspec": "fkl"}
    assert cfgs["distillspec"].data.regime == "onpolicy" and cfgs["distillspec"].onpolicy.lam == 0.5
    adaspec = cfgs["adaspec"]
    assert (adaspec.loss.select, adaspec.loss.reference) == ("reference(keep=0.4)", "./runs/drafts/kd/final")
    assert Path(adaspec.loss.reference) == Path(cfgs["kd"].out_dir) / "final"  # AdaSPEC's reference = the KD draft


def test_adaspec_recipe_without_its_reference_says_which_run_to_do_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./runs/drafts/kd/final does not exist here
    cfg = RunConfig.from_yaml(recipe("adaspec"), TINY)  # loads: the reference is only opened when a run starts
    with pytest.raises(FileNotFoundError, match=r"loss.reference './runs/drafts/kd/final': model directory has no config.json"):
        distill(cfg, progress=False)
    assert not (tmp_path / "runs").exists()  # a refused run leaves nothing behind


@pytest.mark.parametrize("name", RECIPES)
def test_draft_recipe_trains_and_logs_acceptance_at_every_evaluation(draft_runs, name):
    run = draft_runs[name]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    for row in evals:
        assert 0 < row["acceptance_alpha"] < 1 and 0 <= row["top1_agreement"] <= 1
    assert (run / "final" / "config.json").exists() and (run / "final" / "model.safetensors").exists()
    assert "τ =" in (run / "report.md").read_text() and "at γ = 4" in (run / "report.md").read_text()
    if name == "distillspec":
        assert all(r["rollout/on_policy"] == 1.0 for r in rows if r["kind"] == "train")


def _assisted(target, draft, prompt: dict) -> tuple[torch.Tensor, list[int]]:
    """Greedy HF assisted generation; the positions each target forward reads (prefill, then one per round)."""
    positions = []
    hook = target.register_forward_hook(lambda m, args, kwargs, out: positions.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            out = target.generate(**prompt, assistant_model=draft, do_sample=False, max_new_tokens=24)
    finally:
        hook.remove()
    return out, positions


def test_trained_draft_serves_the_teacher_in_hf_assisted_generation(draft_runs):
    """A potstill draft is a plain HF directory: check_draft accepts it for its teacher, and HF assisted generation
    at a fixed γ (configure_hf_assistant) gives exactly the target's greedy output."""
    target_dir, draft_dir = resolve_model_path("builtin"), draft_runs["kd"] / "final"
    info = check_draft("builtin", draft_dir)
    tokenizer = load_tokenizer(target_dir)
    assert (info.vocab_size, info.tokens, info.eos_token_ids) == (479, len(tokenizer), [tokenizer.eos_token_id])
    target = load_causal_lm(target_dir).eval()
    prompt = tokenizer("the cat", return_tensors="pt")
    with torch.no_grad():
        plain = target.generate(**prompt, do_sample=False, max_new_tokens=24)
    default_out, default_rounds = _assisted(target, load_causal_lm(str(draft_dir)).eval(), prompt)
    fixed_out, fixed_rounds = _assisted(target, configure_hf_assistant(load_causal_lm(str(draft_dir)).eval(), 3), prompt)
    assert torch.equal(fixed_out, plain) and torch.equal(default_out, plain)  # lossless either way
    # γ = 3: a round verifies 3 drafts + the last committed token; fewer only when the draft proposed its EOS or
    # the length limit cut the round. transformers' defaults (a confidence threshold) end rounds early instead.
    rounds = fixed_rounds[1:]
    assert max(rounds) == 4 and rounds.count(4) >= 0.75 * len(rounds), fixed_rounds
    assert default_rounds != fixed_rounds
