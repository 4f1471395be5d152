"""The run directory's rules: what blocks a new run, when the directory is created or replaced, and which settings
a resumed run may change.

``check_run_dir`` only reads, so ``distill`` calls it first, loads and validates everything, and only then
``claim_run_dir`` creates (or, with ``--overwrite``, replaces) the directory: a refused run leaves nothing behind.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from potstill import checkpoint
from potstill.config import RunConfig
from potstill.config_parsing import apply_override
from potstill.nested import flatten
from potstill.precision import RESOLVED_ON_RESUME

CONFIG_FILE = "config.yaml"
# What makes a directory "hold a run": anything a training step writes. A directory with none of these (empty, or
# only the config.yaml of a run that died before its first step) is reused as is.
BLOCKING = ("checkpoints", "final", "metrics.jsonl")
# Settings a resumed run may change: cadence, evaluation, placement and memory knobs (gradient checkpointing), none
# of which changes the training trajectory; train.precision and teacher.dtype may be rewritten (auto ↔ explicit) as
# long as they resolve to the checkpoint's values on this device (precision.check_resume refuses anything else).
# Everything else is refused, except that train.max_steps may be raised (extending a run).
MAY_CHANGE = ("train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.on_nonfinite",
               "data.max_eval_examples", "out_dir", "device", "loss.chunk_size", "loss.compile",
               "train.gradient_checkpointing", "train.report_to", "student.lora.save_adapter", *RESOLVED_ON_RESUME)
MAY_CHANGE_SECTIONS = ("eval.", "parallel.", "generate.")  # generate.*: `potstill generate` only
# train.batch_size is per rank: a resumed run may change it, and the number of ranks, iff the global batch stays.
GLOBAL_BATCH = "global batch (train.batch_size × ranks)"
MISSING = "(unset)"


class RunDirError(RuntimeError):
    pass


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, without touching anything, a run directory that the requested run cannot use."""
    if resume:
        if checkpoint.latest_checkpoint(run_dir) is None:
            raise RunDirError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        return
    held = [name for name in BLOCKING if (run_dir / name).exists()]
    if held and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it "
                          f"(found {', '.join(held)})")


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Called once every input is validated and the models are loaded: replace the old run, create the directory."""
    if overwrite and not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def resume_config(overrides: list[str]) -> RunConfig:
    """`distill --resume` without --config: the run's own config.yaml with the given overrides on top, so
    `potstill distill --resume --out RUN` alone continues the run as it was configured."""
    raw: dict = {}
    for item in overrides:
        apply_override(raw, item)
    run_dir = Path(str(raw.get("out_dir") or RunConfig().out_dir))
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        raise RunDirError(f"--resume: {saved} does not exist; is {run_dir} a potstill run directory (--out)?")
    return RunConfig.from_yaml(saved, overrides)


def check_resume_config(run_dir: Path, cfg: RunConfig, world_size: int = 1) -> None:
    """A resumed run continues the trajectory its checkpoints belong to: refuse settings that would change it."""
    saved = run_dir / CONFIG_FILE
    if not saved.exists():
        raise RunDirError(f"--resume: {saved} is missing, so the settings of the run cannot be checked")
    old, new = flatten(yaml.safe_load(saved.read_text()) or {}), flatten(yaml.safe_load(cfg.to_yaml()))
    old_world = checkpoint.saved_world_size(checkpoint.latest_checkpoint(run_dir))
    if old_world != world_size:  # another rank count: what must stay is the global batch (same examples per step)
        for flat, world in ((old, old_world), (new, world_size)):
            if "train.batch_size" in flat:
                flat[GLOBAL_BATCH] = flat.pop("train.batch_size") * world
    # A key the saved config lacks was added to potstill after the run started: at its default it changes nothing.
    defaults = flatten(yaml.safe_load(RunConfig().to_yaml()))
    for key in new.keys() - old.keys():
        if key in defaults and new[key] == defaults[key]:
            old[key] = new[key]
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k, MISSING) != new.get(k, MISSING)]
    refused = [k for k in changed if not _may_change(k, old.get(k, MISSING), new.get(k, MISSING))]
    if refused:
        diffs = "; ".join(f"{k}: {old.get(k, MISSING)!r} → {new.get(k, MISSING)!r}" for k in refused)
        raise RunDirError(f"--resume: {run_dir} was trained with other settings ({diffs}). A resumed run must follow "
                          "the same trajectory: drop these changes (`potstill distill --resume --out RUN` alone uses the "
                          f"run's {CONFIG_FILE}) or start a new run. Only cadence, evaluation and placement settings may "
                          "change, and train.max_steps may be raised")


def _may_change(key: str, old: object, new: object) -> bool:
    if key == "train.max_steps":
        return isinstance(old, int) and isinstance(new, int) and new > old
    return key in MAY_CHANGE or key.startswith(MAY_CHANGE_SECTIONS)
