"""Experiment trackers (`train.report_to`): every line written to metrics.jsonl also goes to each tracker,
through Accelerate's maintained tracker classes. Only the main rank builds trackers (the loop passes
``runtime.is_main``); Accelerate's own main-process gate is switched off so it never initialises a process group
of its own.

A metrics row ``{"step": 10, "kind": "train", "loss": 2.3, ...}`` becomes the scalars ``train/loss`` ... at step
10; the evaluation sample becomes the text ``eval/sample`` where the tracker shows text; the resolved config is
stored once as hyperparameters (flattened to ``section.key``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

from potstill.nested import flatten
from potstill.registry import did_you_mean

# tracker name → the package it needs (tensorboard is a core dependency)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TEXT_TRACKERS = {"tensorboard", "wandb"}  # MLflow's log takes numbers only
TENSORBOARD_DIR = "tensorboard"
IDS_FILE = "trackers.json"  # wandb / mlflow run ids, so a resumed run appends to the same tracker run


def tracker_names(report_to: str | list | None) -> list[str]:
    """The trackers ``train.report_to`` asks for; an unknown name or a missing package is one line, at config load."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = [str(n).strip().lower() for n in names if n is not None and str(n).strip().lower() != "none"]
    for name in names:
        if name not in PACKAGES:
            raise ValueError(f"train.report_to: unknown tracker {name!r}.{did_you_mean(name, PACKAGES)} "
                             f"Use {', '.join(PACKAGES)} or none (a list for several)")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"train.report_to={name} needs the {PACKAGES[name]} package: pip install 'potstill[{name}]' "
                             "(or set train.report_to=none)")
    return list(dict.fromkeys(names))


class Trackers:
    """The run's trackers; ``log`` takes a metrics.jsonl row. Empty (a no-op) off the main rank or with none."""

    def __init__(self, trackers: list | None = None):
        self.trackers = trackers or []

    @classmethod
    def start(cls, report_to, run_dir: Path, config: dict, resume_step: int | None, enabled: bool = True) -> "Trackers":
        """``resume_step``: the checkpoint step a resumed run continues from (None for a new run). TensorBoard then
        purges the events logged after it, as metrics.jsonl drops its lines."""
        names = tracker_names(report_to) if enabled else []
        ids = _read_ids(run_dir) if resume_step is not None else {}
        trackers = [_make(name, Path(run_dir), resume_step, ids) for name in names]
        if trackers:  # Accelerate's trackers log through its logger, which insists on its state existing; under
            from accelerate import PartialState  # torchrun it adopts the process group runtime.setup initialised
            PartialState()
        for tracker in trackers:
            tracker.main_process_only = False  # rank gating is runtime's job (see module doc)
            tracker.start()
        _write_ids(run_dir, trackers)
        if resume_step is None:
            hparams = flat_config(config)
            for tracker in trackers:
                tracker.store_init_configuration(hparams)
        return cls(trackers)

    def log(self, row: dict) -> None:
        if not self.trackers:
            return
        step, kind = int(row["step"]), row.get("kind", "metrics")
        scalars = {f"{kind}/{k}": float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        text = {f"{kind}/sample": row["sample"]} if isinstance(row.get("sample"), str) else {}
        for tracker in self.trackers:
            tracker.log({**scalars, **(text if tracker.name in TEXT_TRACKERS else {})}, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _make(name: str, run_dir: Path, resume_step: int | None, ids: dict):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        if resume_step is None:  # a reused directory (no run in it yet) may hold a dead start's events
            shutil.rmtree(run_dir / TENSORBOARD_DIR, ignore_errors=True)
            return TensorBoardTracker(TENSORBOARD_DIR, run_dir)
        return TensorBoardTracker(TENSORBOARD_DIR, run_dir, purge_step=resume_step + 1)
    if name == "wandb":
        resumed = {"id": ids["wandb"], "resume": "allow"} if "wandb" in ids else {}
        return WandBTracker("potstill", name=run_dir.name, dir=str(run_dir), **resumed)
    # the tracking server / store is MLflow's own setting (MLFLOW_TRACKING_URI; default ./mlruns)
    return MLflowTracker(experiment_name="potstill", run_id=ids.get("mlflow"), run_name=run_dir.name)


def _read_ids(run_dir: Path) -> dict:
    path = Path(run_dir) / IDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_ids(run_dir: Path, trackers: list) -> None:
    ids = {}
    for tracker in trackers:
        if tracker.name == "wandb":
            ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
    if ids:
        (Path(run_dir) / IDS_FILE).write_text(json.dumps(ids))


def flat_config(config: dict) -> dict:
    """The config as flat ``section.key`` hyperparameters; lists become JSON text (hyperparameters are scalars)."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(config).items()}
