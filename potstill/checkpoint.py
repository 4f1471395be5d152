"""Checkpoints are plain HF model directories (safetensors + config + tokenizer) that ``from_pretrained``
loads, with a ``potstill/`` subfolder holding what exact resume needs. Every write goes to a temporary name
and is renamed into place, so a killed run never leaves a half-written checkpoint behind."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from potstill import lora
from potstill.io import atomic_write_text, iter_jsonl

STEP_PREFIX = "step-"
WORLD_FILE = "world.json"  # {"world_size": N}: the rank count that wrote a checkpoint


def save_model_dir(path: Path, model, tokenizer, extra: dict[str, object] | None = None,
                   state_dict: dict | None = None) -> Path:
    """Model + tokenizer (+ extra files under potstill/: str → text, bytes as they are, else torch.save) written
    atomically.
    ``state_dict``: the model's full weights when the model itself holds only a shard of them (FSDP)."""
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if extra:
        (tmp / "potstill").mkdir()
        for name, value in extra.items():
            target = tmp / "potstill" / name
            if isinstance(value, (str, bytes)):
                target.write_text(value) if isinstance(value, str) else target.write_bytes(value)
            else:
                torch.save(value, target)
    if path.exists():
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{STEP_PREFIX}{step:07d}"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, config_yaml: str, state: dict, keep: int,
                    state_dict: dict | None = None) -> Path:
    """``state``: optimizer, scheduler, rng, data position, objective state, world_size — whatever resume needs.
    The world size is also written as a small text file, so that --resume can check it without loading state."""
    path = checkpoint_dir(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    world = json.dumps({"world_size": state.get("world_size", 1)})
    save_model_dir(path, model, tokenizer, {"config.yaml": config_yaml, WORLD_FILE: world,
                                            "trainer_state.pt": {"step": step, **state}}, state_dict)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary and half-written directories are ignored)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / "potstill" / "trainer_state.pt").exists()]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def saved_student_state(path: Path, student) -> dict | None:
    """A checkpoint's student weights as a full HF state dict, for the (possibly wrapped) student to load; for a LoRA
    student its adapters are loaded into it here (its base weights were rebuilt from the config) and None returned."""
    if lora.is_adapted(student):
        lora.load_adapters(path, student)
        return None
    from potstill.encoders.seam import auto_class_of  # a classifier or sentence encoder reloads as its own kind

    return auto_class_of(student).from_pretrained(path, dtype=next(student.parameters()).dtype).state_dict()


def load_trainer_state(path: Path) -> dict:
    # weights_only=False: the state holds python RNG tuples and numpy arrays written by this same code.
    return torch.load(path / "potstill" / "trainer_state.pt", weights_only=False)


def truncate_metrics(metrics_path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (a run killed between checkpoints logged steps it will redo)."""
    if not metrics_path.exists():
        return
    kept = [row for _, row in iter_jsonl(metrics_path) if row["step"] <= step]
    atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))


def saved_world_size(path: Path) -> int:
    """The number of ranks that trained up to checkpoint ``path`` (1 for checkpoints written before it was stored)."""
    world = path / "potstill" / WORLD_FILE
    return int(json.loads(world.read_text())["world_size"]) if world.exists() else 1
