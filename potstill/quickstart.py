"""`potstill quickstart`: offline, on the built-in default. Gets the teacher, distils two students of the
same size with the same token budget (CE-only and KD), evaluates both, prints the comparison, writes reports."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from potstill.config import RunConfig

CONFIG = Path(__file__).parent / "configs" / "quickstart.yaml"
ARMS = {"ce-only": ["loss.objective=ce"], "kd": []}  # kd = the config's own objective


def run_quickstart(out: Path, steps: int | None = None, console: Console | None = None) -> dict[str, dict]:
    from potstill.builtin.teacher import builtin_teacher_dir
    from potstill.report import compare_runs, compare_table_rich
    from potstill.train import distill

    console = console or Console()
    started = time.perf_counter()
    console.print(f"teacher: {builtin_teacher_dir()}")
    results = {}
    for name, overrides in ARMS.items():
        extra = [f"out_dir={out / name}"] + ([f"train.max_steps={steps}"] if steps else [])
        cfg = RunConfig.from_yaml(CONFIG, overrides + extra)
        console.rule(f"{name}: objective {cfg.objective()}")
        results[name] = distill(cfg, overwrite=True).metrics
    runs = [out / name for name in ARMS]
    table_md = compare_runs(runs)
    (out / "comparison.md").write_text("# potstill quickstart: CE-only vs KD at equal budget\n\n" + table_md + "\n")
    console.print(compare_table_rich(runs))
    ce, kd = results["ce-only"]["student_ce"], results["kd"]["student_ce"]
    verdict = "KD beats CE-only" if kd < ce else "KD did NOT beat CE-only"
    console.print(f"held-out CE: CE-only {ce:.4f}, KD {kd:.4f} ({verdict}); teacher "
                  f"{results['kd'].get('teacher_ce', float('nan')):.4f}. {time.perf_counter() - started:.0f} s. "
                  f"Reports: {runs[0] / 'report.md'}, {runs[1] / 'report.md'}, {out / 'comparison.md'}")
    return results
