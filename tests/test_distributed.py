"""Data parallelism with real processes: `torchrun` and `accelerate launch` start 2 CPU ranks (gloo) running
`python -m potstill distill`; their loss trajectories must equal a single process's with the same global batch.

Every run here trains the same tiny tied-embedding Llama student for 4 steps on the same 4 examples per step
(global batch = train.batch_size × grad_accum × ranks = 4), so one in-process reference serves every comparison.
Tolerance: rel 1e-5 — fp32 sums over ranks in another order (seen: ≤ 4e-6 on the losses after 4 AdamW steps)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import potstill
from potstill.builtin import builtin_texts
from potstill.config import RunConfig
from potstill.rundir import RunDirError

from conftest import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
CHECKPOINTS = ("train.save_every=2", "train.keep_checkpoints=3")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("dist")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts("train", 40)))
    return {"root": root, "data": data,
            "teacher": save_tiny_model(root / "teacher", "llama", tokenizer, layers=2, hidden=32, seed=1),
            "student": save_tiny_model(root / "student", "llama", tokenizer, layers=2, hidden=32, seed=2,
                                       tie_word_embeddings=True)}


def overrides(s: dict, out: Path, *extra: str) -> list[str]:
    args = [f"teacher.path={s['teacher']}", f"student.path={s['student']}", f"data.train={s['data']}",
            f"out_dir={out}", "data.max_length=32", "data.max_eval_examples=4", "eval.batch_size=4",
            "eval.max_new_tokens=2", f"train.max_steps={STEPS}", "train.log_every=1", "train.lr=0.01",
            "train.warmup_steps=0", "train.eval_every=0", "device=cpu"]
    return args + list(extra)


def in_process(s: dict, out: Path, *extra: str, resume: bool = False) -> Path:
    return potstill.distill(RunConfig.from_yaml(None, overrides(s, out, *extra)), resume=resume, progress=False).run_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: list[str], s: dict, out: Path, *extra: str, verb: str = "distill") -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HOME": str(out.parent / "hf-home")}
    cmd = [*launcher, "-m", "potstill", verb, *overrides(s, out, *extra)]
    done = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def torchrun(s: dict, out: Path, *extra: str, verb: str = "distill") -> Path:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], s, out,
                  *extra, verb=verb)


def accelerate(s: dict, out: Path, *extra: str) -> Path:
    # --multi_gpu selects accelerate's torchrun launcher (N processes); on a CPU machine they run gloo. With --cpu
    # accelerate starts ONE process (or needs mpirun), so it is not used here.
    return launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port())], s, out, *extra)


def saved_names(model_dir: Path) -> set[str]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return set(f.keys())


def rows(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def assert_same_trajectory(run: Path, reference: Path, steps=range(1, STEPS + 1)) -> None:
    got, want = rows(run), rows(reference)
    assert [r["step"] for r in got] == list(steps)  # exactly one line per step: only rank 0 appended
    want = {r["step"]: r for r in want}
    for r in got:
        for key in ("loss", "grad_norm"):
            assert r[key] == pytest.approx(want[r["step"]][key], rel=1e-5), (r["step"], key)
        assert r["tokens"] == want[r["step"]]["tokens"]  # the same global batch


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    return in_process(setup, setup["root"] / "one-rank", "train.batch_size=4")


@pytest.fixture(scope="module")
def ddp_run(setup) -> Path:
    return torchrun(setup, setup["root"] / "ddp", "train.batch_size=2", *CHECKPOINTS)


def test_ddp_torchrun_equals_one_process(ddp_run, reference):
    assert_same_trajectory(ddp_run, reference)
    assert len(rows(ddp_run, "eval")) == 1 and (ddp_run / "report.md").exists()
    assert not [p for p in ddp_run.rglob(".tmp-*")]
    ckpt = ddp_run / "checkpoints" / "step-0000002"
    assert json.loads((ckpt / "potstill" / "world.json").read_text()) == {"world_size": 2}
    assert len(torch.load(ckpt / "potstill" / "trainer_state.pt", weights_only=False)["rng"]) == 2  # per rank
    AutoModelForCausalLM.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def fsdp_run(setup) -> Path:
    return torchrun(setup, setup["root"] / "fsdp", "train.batch_size=2", "parallel.strategy=fsdp",
                    "parallel.teacher=shard", *CHECKPOINTS)


def test_fsdp_student_and_teacher_sharded_equals_one_process(fsdp_run, reference, ddp_run):
    """FSDP2 over the tied-embedding student (root: embeddings = head) and the frozen teacher; the final model,
    gathered from the shards by rank 0, loads with from_pretrained, keeps its tie and equals the DDP run's."""
    run = fsdp_run
    assert_same_trajectory(run, reference)
    assert rows(run, "eval")[0]["student_ce"] == pytest.approx(rows(ddp_run, "eval")[0]["student_ce"], rel=1e-5)
    fsdp = AutoModelForCausalLM.from_pretrained(run / "final")
    ddp = AutoModelForCausalLM.from_pretrained(ddp_run / "final")
    assert fsdp.lm_head.weight is fsdp.model.embed_tokens.weight or \
        fsdp.lm_head.weight.data_ptr() == fsdp.model.embed_tokens.weight.data_ptr()
    assert saved_names(run / "final") == saved_names(ddp_run / "final")  # the tied head stored once
    for name, weight in ddp.state_dict().items():
        torch.testing.assert_close(fsdp.state_dict()[name], weight, rtol=1e-5, atol=1e-7)


def test_grad_accum_under_ddp_via_accelerate_equals_one_process_grad_accum(setup, reference):
    one = in_process(setup, setup["root"] / "one-rank-accum", "train.batch_size=2", "train.grad_accum=2")
    assert_same_trajectory(one, reference)
    run = accelerate(setup, setup["root"] / "accelerate", "train.batch_size=1", "train.grad_accum=2")
    assert_same_trajectory(run, one)


def test_fsdp_run_resumed_at_max_steps_re_evaluates(setup, fsdp_run):
    """Resumed with no step left, an FSDP2 run evaluates before any training forward (FSDP2's lazy set-up must not
    depend on one); the re-evaluation equals the run's own last evaluation."""
    run = setup["root"] / "fsdp-at-max-steps"
    shutil.copytree(fsdp_run, run)
    torchrun(setup, run, "train.batch_size=2", "parallel.strategy=fsdp", "parallel.teacher=shard", *CHECKPOINTS,
             "--resume")
    first, again = rows(run, "eval")
    assert again["step"] == first["step"] == STEPS
    assert again["student_ce"] == pytest.approx(first["student_ce"], rel=1e-6)


@pytest.mark.parametrize("two_ranks", ["ddp_run", "fsdp_run"])
def test_resume_on_one_rank_from_a_two_rank_checkpoint(setup, two_ranks, request):
    """Checkpoints hold full states and the data position is global: the 2-rank run (batch 2 per rank) continues
    on 1 rank with train.batch_size=4 (the same global batch) along the same trajectory."""
    two_rank_run = request.getfixturevalue(two_ranks)
    run = setup["root"] / f"{two_ranks}-resumed"
    shutil.copytree(two_rank_run, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")  # as if killed after step 3
    shutil.rmtree(run / "final")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= 3))
    with pytest.raises(RunDirError, match=r"global batch \(train.batch_size × ranks\): 4 → 2"):
        in_process(setup, run, "train.batch_size=2", *CHECKPOINTS, resume=True)
    in_process(setup, run, "train.batch_size=4", *CHECKPOINTS, resume=True)
    assert_same_trajectory(run, two_rank_run)


def test_rank_slices_make_up_the_one_process_batch(tokenizer):
    """Each micro-batch takes batch_size × ranks examples of the global permutation; rank r keeps its slice, so
    the ranks together see exactly the one-process batch of batch_size × ranks, step after step, across epochs."""
    from potstill.data.batches import Batcher
    from potstill.data.encode import Example

    examples = [Example(input_ids=[1, 2, 3], labels=[1, 2, 3], example_id=i) for i in range(10)]
    single = Batcher(examples, 4, seed=3, pad_id=0)
    ranks = [Batcher(examples, 2, seed=3, pad_id=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):  # 2 per epoch: the tail of 2 is skipped, as in one process
        whole = single.next_batch()["example_id"].tolist()
        assert sum((b.next_batch()["example_id"].tolist() for b in ranks), []) == whole
        assert all(b.state() == single.state() for b in ranks)


@pytest.mark.parametrize("override,message", [
    ("parallel.strategy=zero3", "parallel.strategy='zero3': use auto, ddp or fsdp"),
    ("parallel.teacher=offload", "parallel.teacher='offload': use replicate or shard"),
])
def test_parallel_settings_are_checked_at_load(setup, override, message):
    """One line at config load for each setting, and for combinations FSDP2 cannot serve."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RunConfig.from_yaml(None, overrides(setup, setup["root"] / "unused", override))
    cached = [f"student.path={setup['student']}", "teacher.cache=/some/cache", "parallel.teacher=shard"]
    with pytest.raises(ValueError, match="parallel.teacher=shard shards a live teacher"):
        RunConfig.from_yaml(None, cached)


def test_ddp_composes_with_lora_packing_checkpointing_and_trackers(setup):
    """The features of one run together under DDP: a LoRA student (adapters synchronised, merged final/), packed
    rows, gradient checkpointing and the TensorBoard tracker — same trajectory as one process, events from rank 0 only."""
    extra = ("student.lora.r=4", "data.packing=true", "train.gradient_checkpointing=true", "train.report_to=tensorboard")
    one = in_process(setup, setup["root"] / "one-rank-combined", "train.batch_size=4", *extra)
    run = torchrun(setup, setup["root"] / "ddp-combined", "train.batch_size=2", *extra)
    assert_same_trajectory(run, one)
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # one process (rank 0) wrote every event file (scalars, and hparams in a subfolder)
    assert not any("lora_" in name for name in saved_names(run / "final"))  # merged into a plain model
    AutoModelForCausalLM.from_pretrained(run / "final")  # a plain HF model, no peft needed
    # The merged weights are compared through what they compute (held-out CE), not element by element: after 4
    # AdamW steps an element whose gradient is ~0 can move by ±lr on a rounding difference of the rank sums.
    assert rows(run, "eval")[0]["student_ce"] == pytest.approx(rows(one, "eval")[0]["student_ce"], rel=1e-5)


@pytest.mark.parametrize("extra,message", [
    ("train.precision=fp16", "train.precision=fp16 with parallel.strategy=fsdp"),
    ("student.lora.r=4", "parallel.strategy=fsdp with student.lora"),
])
def test_fsdp_refuses_combinations_it_cannot_serve(setup, extra, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_yaml(None, overrides(setup, setup["root"] / "unused", "parallel.strategy=fsdp", extra))


def test_cache_built_by_two_ranks_trains_like_one_built_by_one_process(setup):
    """`potstill cache` under torchrun: each rank writes the shards it owns (shard i on rank i % 2), rank-strided,
    and the finished cache serves a run exactly as a cache built by one process does."""
    cache_args = ("cache.mode=topk", "cache.k=4", "cache.shard_size=8", "cache.batch_size=4")
    two = setup["root"] / "cache-two-ranks"
    torchrun(setup, setup["root"] / "cache-unused-run", f"teacher.cache={two}", *cache_args, verb="cache")
    one = setup["root"] / "cache-one-process"
    from potstill.cache.run import build_from_config
    build_from_config(RunConfig.from_yaml(None, overrides(setup, setup["root"] / "unused", f"teacher.cache={one}",
                                                          *cache_args), check_run=False), progress=False)
    shards = sorted(p.name for p in two.glob("shard-*.safetensors"))
    assert len(shards) == 5 and shards == sorted(p.name for p in one.glob("shard-*.safetensors"))  # 40 examples / 8
    runs = [in_process(setup, setup["root"] / f"from-{cache.name}", f"teacher.cache={cache}", "train.batch_size=4",
                       "loss.objective=rkl") for cache in (two, one)]
    assert [r["loss"] for r in rows(runs[0])] == [r["loss"] for r in rows(runs[1])]
