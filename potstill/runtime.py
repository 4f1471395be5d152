"""Device, seed, RNG state and rank: the only module that touches torch.distributed.

The loop calls these functions unconditionally; in a single process they are no-ops, so train.py has no
``if cuda`` / ``if rank`` branches. Under ``torchrun`` (WORLD_SIZE > 1) the process group is initialised here.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            x = x.to(self.device)
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available; use device=cpu or auto")
    return device


def setup(device: str = "auto", multi_process: bool = False) -> Runtime:
    """``multi_process``: the caller shards its own work by rank (cache building). Training does not yet wrap the
    student for data parallelism, so it refuses to run under torchrun rather than train N unsynchronised copies."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not multi_process:
        raise RuntimeError(f"WORLD_SIZE={world}: multi-process training is not supported yet; run distill as a single "
                           "process (building a cache under torchrun is supported: each rank writes its own shards)")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    return Runtime(dev, rank, world)


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
