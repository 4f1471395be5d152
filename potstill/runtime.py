"""Device, seed, RNG state, ranks and data parallelism: the only module that touches torch.distributed.

The loop calls these functions unconditionally; in a single process they are no-ops (or plain calls), so
train.py has no ``if cuda`` / ``if rank`` branches. Under ``torchrun`` or ``accelerate launch`` (WORLD_SIZE > 1)
the process group is initialised here and ``parallelize`` wraps the student's forward seam
(``models.HiddenAndHead``) in DDP or FSDP2 (docs/distributed.md).

Normalisation: each rank's loss is its local sum ÷ the step's *global* valid-token count, so the step's gradient
is the SUM of the ranks' gradients. DDP gets a comm hook that all-reduces without dividing; FSDP2 gets a gradient
divide factor of 1 with sum-only collectives. The loss is never multiplied by the world size.
"""
from __future__ import annotations

import os
import random
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "ddp", "fsdp")
TEACHER_MODES = ("replicate", "shard")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, on the CPU where ``x`` was (gloo and nccl both reduce a copy on the device)."""
        if self.world_size > 1:
            reduced = x.to(self.device)
            dist.all_reduce(reduced)
            return reduced.to(x.device)
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects: RNG states)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available; use device=cpu or auto")
    return device


def setup(device: str = "auto") -> Runtime:
    """One process per rank as torchrun / accelerate launch start them (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*):
    gloo on the CPU, nccl on GPUs, each rank on GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Runtime(dev, rank, world)


def shutdown() -> None:
    """Destroy the process group ``setup`` joined, once the verb is done. Left to interpreter exit, a finished
    rank's gloo worker threads can be destroyed while still joinable (std::terminate: "terminate called without
    an active exception", exit -6, after the run itself completed), which fails the launch."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launched_rank() -> int:
    """This process's rank as the launcher set it (RANK; 0 when not launched by torchrun/accelerate), readable
    before the process group exists: the CLI prints its console output on rank 0 only."""
    return int(os.environ.get("RANK", "0"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_ranks(rt: Runtime, seed: int, step: int = 0) -> None:
    """Distinct RNG streams per rank (dropout), from (seed, step, rank). Called once the models exist (they were
    initialised identically on every rank) and on a resume with another rank count; a single process keeps the
    stream ``seed_everything`` started."""
    if rt.world_size > 1:
        seed_everything(seed + 1_000_003 * step + 7919 * (rt.rank + 1))


def rank_rng_states(rt: Runtime) -> list[dict]:
    """Every rank's RNG state (rank order): checkpoints hold them all."""
    return rt.gather_objects(rng_state())


def restore_rank_rng(rt: Runtime, states: list[dict], seed: int, step: int) -> None:
    """Each rank takes its own saved state; saved under another rank count, the ranks are re-seeded instead."""
    if len(states) == rt.world_size:
        set_rng_state(states[rt.rank])
    else:
        seed_ranks(rt, seed, step)


# ---- data parallelism ----------------------------------------------------------------------------------------


def check_settings(cfg) -> None:
    """The run config's `parallel` section and the combinations FSDP2 cannot serve, checked at config load."""
    p = cfg.parallel
    if p.strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"parallel.strategy={p.strategy!r}: use auto, ddp or fsdp")
    if p.teacher not in ("replicate", "shard"):
        raise ValueError(f"parallel.teacher={p.teacher!r}: use replicate or shard")
    if p.strategy == "fsdp" and cfg.train.precision == "fp16":
        raise ValueError("train.precision=fp16 with parallel.strategy=fsdp: the grad scaler would see only this "
                         "rank's gradient shard (ranks could disagree on skipping a step); use train.precision=bf16")
    if p.strategy == "fsdp" and cfg.student.lora.r > 0:
        raise ValueError("parallel.strategy=fsdp with student.lora: LoRA students train with parallel.strategy=ddp "
                         "(their trainable weights are small; FSDP2 over a PEFT model is not supported yet)")
    if p.teacher == "shard" and (cfg.teacher.cache or not cfg.teacher.path):
        raise ValueError("parallel.teacher=shard shards a live teacher: it needs teacher.path and no teacher.cache")


def resolve_strategy(strategy: str, world_size: int) -> str:
    """'none' in a single process (nothing to wrap), else the configured engine ('auto' = ddp)."""
    if world_size == 1:
        return "none"
    return "ddp" if strategy == "auto" else strategy


def _sum_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP comm hook: all-reduce SUM of a dist.GradBucket without DDP's default division by the world size."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks (the classes transformers never splits across devices: LlamaDecoderLayer, GPT2Block...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise NotImplementedError(f"{type(model).__name__} names no decoder block class (_no_split_modules), so FSDP "
                                  "cannot shard it block by block; use parallel.strategy=ddp")
    return blocks


def _fully_shard(seam: nn.Module, model: nn.Module, mesh) -> None:
    """FSDP2 per decoder block, then the seam as root (embeddings, final norm, head: unsharded in its forward)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # The seam returns views (the head trimmed to [:vocab], the hidden states); FSDP2 warns that an in-place op on
    # such a view would skip its pre-backward hook. The loss path never writes into them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(seam, mesh=mesh)
    for module in seam.modules():
        if isinstance(module, FSDPModule):  # reduce-scatter SUMS (gloo has no pre-multiplied sum; nccl needs none)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _repeated_names(module: nn.Module) -> set[str]:
    """Names under which an already-listed parameter is registered again (a tied head: 'model.lm_head.weight')."""
    seen, repeated = set(), set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            repeated.add(name)
        seen.add(id(param))
    return repeated


@dataclass
class Parallel:
    """The forward seams the loop calls (student wrapped for DDP/FSDP2; teacher/reference sharded or replicated)
    and what the loop needs of the wrapping: micro-batch gradient sync, global clipping, gathered parameters for
    evaluation, full state dicts for checkpoints."""

    rt: Runtime
    strategy: str  # none | ddp | fsdp
    student: nn.Module
    teacher: nn.Module | None = None
    reference: nn.Module | None = None
    frozen_sharded: bool = False

    def micro_batch(self, last: bool):
        """Context for one micro-batch's forward + backward: gradients are reduced over ranks only on the last."""
        if self.strategy == "ddp" and not last:
            return self.student.no_sync()
        if self.strategy == "fsdp":
            self.student.set_requires_gradient_sync(last)
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip to ``max_norm`` by the global gradient norm (FSDP2's DTensor shard norms are reduced over ranks)."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.student.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.item()

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """The root FSDP parameters unsharded, so the HF models may be called directly (evaluation, generation;
        every rank must take part). Decoder blocks unshard themselves in their own forward."""
        roots = [self.student] if self.strategy == "fsdp" else []
        roots += [m for m in (self.teacher, self.reference) if m is not None and self.frozen_sharded]
        for root in roots:
            root.unshard()
        try:
            yield
        finally:
            for root in roots:
                root.reshard()

    def model_state(self) -> dict | None:
        """The student's full HF state dict on rank 0 when FSDP shards it (a collective: every rank calls it);
        None when the model on rank 0 holds every weight and saves itself."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # A tied head is one parameter under two names; the full state dict holds two copies, and saving both would
        # store it twice. Keep its first name, as save_pretrained does for an unwrapped model.
        repeated = _repeated_names(self.student)
        return {k.removeprefix("model."): v for k, v in full.items() if k not in repeated}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's full state keyed by parameter name (rank 0; a collective), loadable on any rank count."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.student, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load(self, model_state: dict | None, optimizer: torch.optim.Optimizer, optimizer_state: dict) -> None:
        """Full (unsharded) states, read by every rank, into the wrapped student and its optimizer (``model_state``
        None: the weights are in place already, e.g. a LoRA student's adapters)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        if model_state is not None:
            set_model_state_dict(self.student, {f"model.{k}": v for k, v in model_state.items()}, options=options)
        set_optimizer_state_dict(self.student, optimizer, optimizer_state, options=options)


def parallelize(rt: Runtime, student: nn.Module, frozen: tuple[nn.Module | None, nn.Module | None], vocab: int,
                strategy: str = "auto", teacher_mode: str = "replicate", make_seam=None) -> Parallel:
    """Seams (``models.HiddenAndHead``, or ``make_seam(model, vocab, role)``: hidden-state KD's) over the student
    and the frozen (teacher, reference) models, wrapped for this world size. Build the optimizer AFTER this (from
    the seam's parameters): FSDP2 replaces the student's parameters by DTensor shards."""
    from potstill.models import HiddenAndHead

    make_seam = make_seam or (lambda model, size, role: HiddenAndHead(model, size))
    chosen = resolve_strategy(strategy, rt.world_size)
    seam = make_seam(student, vocab, "student")
    frozen_seams = [None if m is None else make_seam(m, vocab, role) for m, role in zip(frozen, ("teacher", "reference"))]
    shard_frozen = rt.world_size > 1 and teacher_mode == "shard"
    mesh = None
    if chosen == "fsdp" or shard_frozen:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    if chosen == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        seam = DistributedDataParallel(seam, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        seam.register_comm_hook(None, _sum_allreduce_hook)
    elif chosen == "fsdp":
        _fully_shard(seam, student, mesh)
    if shard_frozen:
        for frozen_seam in frozen_seams:
            if frozen_seam is not None:
                _fully_shard(frozen_seam, frozen_seam.model, mesh)
    return Parallel(rt, chosen, seam, *frozen_seams, frozen_sharded=shard_frozen)
