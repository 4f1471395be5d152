"""Acceptance and wall-clock speed-up of the speculative-decoding drafts of `benchmarks/speculative_drafts.py`
(issue #15): `potstill speculate`'s measurement (``potstill.speculative.measure``) run for every draft, greedy and
at T = 1, then one comparison across the drafts.

    python benchmarks/speculative.py --target runs/spec/target/model --drafts runs/spec/drafts --out runs/spec/measure \
        [--prompts 32] [--new-tokens 64] [--gamma 1-8] [--temperatures 0 1]

Per draft and temperature this is `potstill speculate --target T --draft DRAFTS/<name>/final --prompts builtin
--eval-data builtin --gamma 1-8 --adaptive --temperature T --max-prompts 32 --max-new-tokens 64 --device cpu
--dtype float32` on one CPU thread (torch.set_num_threads(1)): held-out built-in prompts (the first 32 validation
texts' first 8 words), batch 1, every method (target-only, draft-only, potstill at each γ and adaptive, HF assisted
at each γ) on prompt i before any on prompt i + 1, so a slow spell of the shared machine falls on all of them; its
report goes to OUT/<name>/<greedy|t1>/. HF assisted generation runs greedy only unless --hf-sampling.

Added here across drafts: the speed-up as the median over prompts of the per-prompt ratio (target-only seconds per
token ÷ the method's, timed back to back) beside measure's pooled ratio, and the acceptance by draft position in
a round. Writes OUT/summary.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch

from potstill.speculative.inputs import MeasureSettings, load_inputs, parse_gammas
from potstill.speculative.measure import measure
from potstill.speculative.report import write_outputs

DRAFT_ORDER = ("start", "ce", "kd", "distillspec", "adaspec")


def run_draft(target: str, draft: Path, out: Path, temperature: float, args) -> dict:
    settings = MeasureSettings(target=target, draft=str(draft), prompts="builtin", out=str(out),
                               gammas=parse_gammas(args.gamma), adaptive=True, temperature=temperature,
                               max_new_tokens=args.new_tokens, max_prompts=args.prompts,
                               hf_assisted=temperature == 0 or args.hf_sampling, eval_data="builtin", seed=0,
                               device="cpu", dtype="float32", warmup=1)
    results = measure(settings, load_inputs(settings))
    write_outputs(results, out)
    return results


def median_speedup(results: dict, key: str) -> float:
    """Median over prompts of (target-only s/token) ÷ (method s/token), each prompt's pair timed back to back."""
    per = results["per_prompt"]
    ratios = [(b["seconds"] / b["tokens"]) / (m["seconds"] / m["tokens"])
              for b, m in zip(per["target"], per[key]) if b["tokens"] and m["tokens"]]
    return statistics.median(ratios) if ratios else math.nan


def alpha_by_position(results: dict, gamma: int) -> list[float]:
    """Acceptance at draft position k of a round (1..γ), among rounds that reached it (accepted ≥ k − 1)."""
    rounds = [r for p in results["per_prompt"][f"potstill:{gamma}"] for r in p["rounds"]]
    rates = []
    for k in range(1, gamma + 1):
        reached = [a for g, a in rounds if g >= k and a >= k - 1]
        rates.append(sum(a >= k for a in reached) / len(reached) if reached else math.nan)
    return rates


def pooled_alpha(results: dict) -> float:
    rows = [r for r in results["rows"] if r["gamma"] is not None]
    return sum(r["accepted"] for r in rows) / max(sum(r["verified"] for r in rows), 1)


def condensed(results: dict) -> dict:
    """What the cross-draft tables need from one measure() result."""
    rows = []
    for r in results["rows"]:
        key = r["method"]
        rows.append({"gamma": r["gamma"] if r["gamma"] is not None else f"adaptive ({r['mean_gamma']:.2f})",
                     "alpha_measured": r["alpha_measured"], "alpha_analytic": r["alpha_analytic"], "tau": r["tau"],
                     "speedup": r["speedup"], "speedup_median": median_speedup(results, key),
                     "speedup_predicted": r.get("speedup_predicted"), "hf_speedup": _hf_speedup(results, r),
                     "hf_speedup_median": median_speedup(results, f"hf:{r['gamma']}") if r.get("hf_tokens_per_s") else None,
                     "speedup_vs_hf": r.get("speedup_vs_hf"), "hf_tau": r.get("hf_tau"), "mismatches": r.get("greedy_mismatches"),
                     "hf_mismatches": r.get("hf_greedy_mismatches")})
    widest = max(g for g in (r["gamma"] for r in results["rows"]) if g is not None)
    return {"held_out_alpha": results["held_out"]["alpha"], "alpha_pooled": pooled_alpha(results),
            "cost_ratio": results["baselines"]["cost_ratio"],
            "target_tokens_per_s": results["baselines"]["target"]["tokens_per_s"], "rows": rows,
            "alpha_by_position": alpha_by_position(results, widest), "widest": widest}


def _hf_speedup(results: dict, row: dict) -> float | None:
    hf = row.get("hf_tokens_per_s")
    return hf / results["baselines"]["target"]["tokens_per_s"] if hf else None


def _f(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def tables(summary: dict) -> str:
    drafts = summary["drafts"]
    lines = ["| draft | train steps | train s | held-out CE | KL(target‖draft) | α held-out greedy (top-1 agree) | "
             "α measured greedy | α held-out T=1 (1 − TVD) | α measured T=1 | c (draft/target s per token) |",
             "|---|" + "---:|" * 9]
    for name, d in drafts.items():
        t, g, s = d["train"], d.get("greedy"), d.get("t1")
        lines.append(f"| {name} | {t.get('steps', '–')} | {t.get('seconds', '–')} | {_f(t.get('student_ce'), 3)} | "
                     f"{_f(t.get('kl_teacher_student'), 3)} | {_f(g and g['held_out_alpha'], 3)} | "
                     f"{_f(g and g['alpha_pooled'], 3)} | {_f(s and s['held_out_alpha'], 3)} | "
                     f"{_f(s and s['alpha_pooled'], 3)} | {_f(g and g['cost_ratio'], 3)} |")
    for key, title in (("greedy", "Greedy (T = 0)"), ("t1", "Sampling (T = 1)")):
        lines += ["", f"{title}: speed-up vs target-only `sample` = median of per-prompt ratios (pooled tokens/s "
                      "ratio in brackets); potstill ÷ HF = tokens/s ratio at the same γ", "",
                  "| draft | γ | α measured | α analytic | τ | predicted | potstill | HF τ | HF assisted | potstill ÷ HF | "
                  "mismatches (potstill, HF) |", "|---|---|" + "---:|" * 8 + "---|"]
        for name, d in drafts.items():
            for r in (d.get(key) or {}).get("rows", []):
                lines.append(f"| {name} | {r['gamma']} | {_f(r['alpha_measured'], 3)} | {_f(r['alpha_analytic'], 3)} | "
                             f"{_f(r['tau'])} | {_f(r['speedup_predicted'])} | {_f(r['speedup_median'])} "
                             f"({_f(r['speedup'])}) | {_f(r.get('hf_tau'))} | {_f(r['hf_speedup_median'])} ({_f(r['hf_speedup'])}) | "
                             f"{_f(r['speedup_vs_hf'])} | {r['mismatches']}, {r['hf_mismatches']} |")
    widest = next(d[k]["widest"] for d in drafts.values() for k in ("greedy", "t1") if d.get(k))
    lines += ["", f"Acceptance by draft position k within a round at γ = {widest} (among rounds that reached k)", "",
              "| draft | T | " + " | ".join(f"k={k}" for k in range(1, widest + 1)) + " |", "|---|---|" + "---:|" * widest]
    for name, d in drafts.items():
        for key in ("greedy", "t1"):
            if d.get(key):
                lines.append(f"| {name} | {key} | " + " | ".join(_f(a, 3) for a in d[key]["alpha_by_position"]) + " |")
    return "\n".join(lines)


def rebuild(out: Path) -> None:
    """The cross-draft tables again from the per-draft results.json files (e.g. after a table change)."""
    summary = json.loads((out / "summary.json").read_text())
    for name, entry in summary["drafts"].items():
        for key in ("greedy", "t1"):
            path = out / name / key / "results.json"
            if key in entry and path.exists():
                entry[key] = {**entry[key], **condensed(json.loads(path.read_text()))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = tables(summary)
    (out / "table.md").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--drafts", type=Path, required=True, help="speculative_drafts.py's --out (DRAFTS/<name>/final)")
    parser.add_argument("--out", type=Path, default=Path("runs/spec/measure"))
    parser.add_argument("--only", nargs="*", default=None, help="draft names (default: every one found)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gamma", default="1-8")
    parser.add_argument("--temperatures", type=float, nargs="*", default=[0.0, 1.0])
    parser.add_argument("--hf-sampling", action="store_true", help="also time HF assisted generation at T > 0")
    parser.add_argument("--rebuild", action="store_true", help="measure nothing: rebuild OUT/table.md from OUT/*/*/results.json")
    args = parser.parse_args()
    if args.rebuild:
        rebuild(args.out)
        return
    torch.set_num_threads(1)
    trained = json.loads((args.drafts / "drafts.json").read_text()) if (args.drafts / "drafts.json").exists() else {}
    steps = trained.get("settings", {}).get("steps")
    names = args.only or [n for n in DRAFT_ORDER if (args.drafts / n / "final").exists()]
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"drafts": {}}
    summary["settings"] = {**vars(args), "drafts": str(args.drafts), "out": str(args.out), "threads": 1}
    for name in names:
        entry = summary["drafts"].setdefault(name, {})
        entry["train"] = {**trained.get(name, {}), "steps": steps}
        for temperature in args.temperatures:
            key = "greedy" if temperature == 0 else "t1"
            load = os.getloadavg()
            results = run_draft(args.target, args.drafts / name / "final", args.out / name / key, temperature, args)
            entry[key] = {**condensed(results), "load_before": load, "load_after": os.getloadavg()}
            print(f"{name} {key}: load {load[0]:.2f}→{os.getloadavg()[0]:.2f} " + ", ".join(
                f"γ={r['gamma']} α={_f(r['alpha_measured'], 3)} ×{_f(r['speedup_median'])}/HF ×{_f(r['hf_speedup_median'])}"
                for r in entry[key]["rows"]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(summary, indent=2))
    text = tables(summary)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
