"""potstill: distil large language models into small ones.

Public API (stable names; the CLI is a thin layer over them)::

    fn = potstill.divergence("gjsd", beta=0.5)      # per-token fn(student_logp, teacher_logp) -> (...)
    potstill.list_divergences()                     # every registered objective with its hyperparameters
    cfg = potstill.RunConfig.from_yaml("configs/quickstart.yaml", overrides=["train.max_steps=50"])
    result = potstill.distill(cfg)                  # run dir, final student dir, last metrics
"""
from __future__ import annotations

from potstill.config import RunConfig
from potstill.losses.divergences import divergence, list_divergences

__version__ = "0.1.0"
__all__ = ["RunConfig", "distill", "divergence", "list_divergences", "__version__"]


def distill(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True):
    """The same run as ``potstill distill``; returns a RunResult (run_dir, final_dir, metrics)."""
    from potstill.train import distill as _distill  # imported lazily: transformers is slow to import

    return _distill(cfg, resume=resume, overwrite=overwrite, progress=progress)
