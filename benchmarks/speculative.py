"""Acceptance and wall-clock speed-up of speculative decoding drafts (issue #15), potstill's decoder beside HF
assisted generation with the same draft and γ.

    python benchmarks/speculative.py --target runs/spec/target/model --drafts runs/spec/drafts --out runs/spec/measure \
        [--prompts 32] [--new-tokens 64] [--gammas 1 2 3 4 5 6 7 8]

Prompts: the first `--prompts` built-in validation texts cut to BOS + their first 8 tokens (held out: no draft or
target trained on them). Every run is batch 1 on one CPU thread (torch.set_num_threads(1)). For each draft
(`benchmarks/speculative_drafts.py` writes them: DRAFTS/<name>/final) and γ:

- greedy (T = 0): target-only `potstill.sampling.sample`, potstill's `speculate`, HF `target.generate(
  assistant_model=draft)` at a constant γ (the draft's generation_config: num_assistant_tokens = γ,
  num_assistant_tokens_schedule = "constant", assistant_confidence_threshold = 0) and HF target-only `generate`;
  all four run prompt by prompt, interleaved in a rotating order, so load noise hits them alike. The outputs must
  be the target's greedy continuation: mismatches are counted.
- sampling (T = 1): target-only `sample` and `speculate`, interleaved the same way.

Speed-up = median over prompts of (target-only seconds per new token) / (method's seconds per new token), each
prompt's pair timed back to back; the pooled ratio (Σ seconds / Σ tokens) is reported too. α measured = accepted /
verified draft positions; α analytic = Σ_v min(p, q) over the verified positions / verified (sampling); τ =
committed tokens / target verification calls (the correction or bonus token counted). α predicted = teacher-forced
on held-out built-in text (validation texts after the prompts): the share of positions where draft and target
argmax agree (greedy), mean 1 − TVD(p, q) (T = 1). c = the draft's forward time / the target's, from the
decoder's own timers; predicted speed-up = τ(α measured, γ) / (γ·c + 1). Writes OUT/measure.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from potstill.builtin.sources import builtin_records
from potstill.models import load_causal_lm, load_tokenizer
from potstill.sampling import SamplingSettings, sample, sampling_logprobs
from potstill.speculative.acceptance import expected_acceptance, predicted_speedup
from potstill.speculative.decode import SpeculativeSettings, speculate

PROMPT_TOKENS = 8
DRAFT_ORDER = ("ce", "kd", "distillspec", "adaspec")


def held_out(tokenizer, n_prompts: int, n_texts: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts: BOS + the first PROMPT_TOKENS tokens of the first n_prompts validation texts, the next n_texts
    validation texts tokenised whole for the teacher-forced α)."""
    records = [r["text"] for _, r in builtin_records("builtin", "validation", n_prompts + n_texts)]
    bos = tokenizer.bos_token_id
    prompts = [[bos] + tokenizer.encode(t, add_special_tokens=False)[:PROMPT_TOKENS] for t in records[:n_prompts]]
    texts = [tokenizer(t)["input_ids"] for t in records[n_prompts:]]
    return prompts, texts


@torch.no_grad()
def predicted_alpha(target, draft, texts: list[list[int]]) -> dict:
    """Teacher-forced on whole texts: greedy agreement and mean 1 − TVD at T = 1 over every predicted position."""
    settings = SamplingSettings(temperature=1.0)
    agree = tvd_alpha = positions = 0.0
    for ids in texts:
        x = torch.tensor([ids])
        p_logits, q_logits = target(input_ids=x).logits[0, :-1].float(), draft(input_ids=x).logits[0, :-1].float()
        agree += (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
        tvd_alpha += expected_acceptance(sampling_logprobs(q_logits, settings), sampling_logprobs(p_logits, settings)).sum().item()
        positions += p_logits.shape[0]
    return {"greedy": agree / positions, "t1": tvd_alpha / positions, "positions": int(positions)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def configure_assistant(draft, gamma: int) -> None:
    """HF assisted generation at a fixed γ: no heuristic schedule, no confidence-based early stop."""
    draft.generation_config.num_assistant_tokens = gamma
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


def hf_tokens(out: torch.Tensor, prompt_len: int, eos: int) -> list[int]:
    tokens = out[0, prompt_len:].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def methods(target, draft, prompt: list[int], gamma: int, temperature: float, new_tokens: int, eos: int, pad: int,
            seed: int) -> dict:
    """name → zero-argument callable returning the new tokens (and the speculative result where there is one)."""
    spec = SpeculativeSettings(max_new_tokens=new_tokens, temperature=temperature, gamma=gamma)
    base = SamplingSettings(max_new_tokens=new_tokens, temperature=temperature)
    ids = torch.tensor([prompt])
    hf_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "do_sample": False,
                 "max_new_tokens": new_tokens, "eos_token_id": eos, "pad_token_id": pad}
    calls = {
        "target": lambda: (sample(target, [prompt], base, eos_ids=eos, pad_id=pad, seed=seed).tokens[0], None),
        "potstill": lambda: (lambda r: (r.tokens, r))(speculate(target, draft, prompt, spec, eos_ids=eos, seed=seed)),
    }
    if temperature == 0:
        calls["hf_assisted"] = lambda: (hf_tokens(target.generate(assistant_model=draft, **hf_kwargs), len(prompt), eos), None)
        calls["hf_target"] = lambda: (hf_tokens(target.generate(**hf_kwargs), len(prompt), eos), None)
    return calls


@torch.no_grad()
def measure_cell(target, draft, prompts, gamma: int, temperature: float, new_tokens: int, eos: int, pad: int) -> dict:
    """Every method on every prompt, interleaved prompt by prompt (the order rotates)."""
    configure_assistant(draft, gamma)
    per = {}  # method → list of (seconds, tokens)
    results, mismatches = [], {}
    for i, prompt in enumerate(prompts):
        calls = methods(target, draft, prompt, gamma, temperature, new_tokens, eos, pad, seed=i)
        names = list(calls)
        names = names[i % len(names):] + names[: i % len(names)]
        outputs = {}
        for name in names:
            (tokens, result), seconds = timed(calls[name])
            per.setdefault(name, []).append((seconds, len(tokens)))
            outputs[name] = tokens
            if result is not None:
                results.append(result)
        if temperature == 0:
            for name in outputs:
                mismatches[name] = mismatches.get(name, 0) + (outputs[name] != outputs["target"])
    return summarise(per, results, gamma, mismatches)


def summarise(per: dict, results: list, gamma: int, mismatches: dict) -> dict:
    base = per["target"]
    row = {"gamma": gamma, "mismatches": mismatches, "tokens": sum(n for _, n in base)}
    for name, runs in per.items():
        ratios = [(bs / bn) / (s / n) for (bs, bn), (s, n) in zip(base, runs) if n and bn]
        row[name] = {"seconds": sum(s for s, _ in runs), "tokens": sum(n for _, n in runs),
                     "ms_per_token": 1000 * sum(s for s, _ in runs) / sum(n for _, n in runs),
                     "speedup_median": statistics.median(ratios),
                     "speedup_pooled": (sum(s for s, _ in base) / sum(n for _, n in base))
                     / (sum(s for s, _ in runs) / sum(n for _, n in runs))}
    accepted, verified = sum(r.accepted for r in results), sum(r.verified for r in results)
    calls, committed = sum(r.target_calls for r in results), sum(len(r.tokens) for r in results)
    draft_per_forward = sum(r.draft_seconds for r in results) / max(sum(r.proposed for r in results), 1)
    target_per_call = sum(r.target_seconds for r in results) / max(calls, 1)
    alpha = accepted / verified if verified else math.nan
    rounds = [rd for r in results for rd in r.rounds]
    cost = draft_per_forward / target_per_call
    row.update({"alpha_measured": alpha, "alpha_analytic": sum(r.expected_accepted for r in results) / max(verified, 1),
                "acceptance_rate": accepted / max(sum(r.proposed for r in results), 1), "tau": committed / max(calls, 1),
                "cost_ratio": cost, "alpha_by_position": alpha_by_position(rounds, gamma),
                "predicted_speedup": predicted_speedup(alpha, gamma, cost) if not math.isnan(alpha) else math.nan})
    return row


def alpha_by_position(rounds: list[tuple[int, int]], gamma: int) -> list[float]:
    """Acceptance at draft position k of a round (1..γ), among rounds that reached it (accepted ≥ k − 1)."""
    rates = []
    for k in range(1, gamma + 1):
        reached = [a for g, a in rounds if g >= k and a >= k - 1]
        rates.append(sum(a >= k for a in reached) / len(reached) if reached else math.nan)
    return rates


def load(path: str | Path):
    model = load_causal_lm(str(path)).eval()
    return model


def tables(report: dict) -> str:
    lines = ["| draft | train steps | train s | held-out CE | KL(target‖draft) | α pred. greedy | α meas. greedy | "
             "α pred. T=1 (1−TVD) | α meas. T=1 | α analytic T=1 |", "|---|" + "---:|" * 9]
    for name, d in report["drafts"].items():
        g, s = d["greedy"], d["t1"]
        pooled = lambda rows, key: statistics.fmean(r[key] for r in rows)  # noqa: E731 (mean over γ)
        lines.append(f"| {name} | {d['train'].get('steps', '')} | {d['train'].get('seconds', '')} | "
                     f"{d['train'].get('student_ce', math.nan):.3f} | {d['train'].get('kl_teacher_student', math.nan):.3f} | "
                     f"{d['predicted']['greedy']:.3f} | {pooled(g, 'alpha_measured'):.3f} | {d['predicted']['t1']:.3f} | "
                     f"{pooled(s, 'alpha_measured'):.3f} | {pooled(s, 'alpha_analytic'):.3f} |")
    lines += ["", "Greedy (T = 0): speed-up vs target-only `sample` (median of per-prompt ratios; pooled in brackets)", "",
              "| draft | γ | α | τ | c | predicted | potstill | HF assisted | HF target-only | potstill / HF assisted | mismatches (potstill, HF) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, d in report["drafts"].items():
        for r in d["greedy"]:
            p, h, ht = r["potstill"], r["hf_assisted"], r["hf_target"]
            lines.append(f"| {name} | {r['gamma']} | {r['alpha_measured']:.3f} | {r['tau']:.2f} | {r['cost_ratio']:.3f} | "
                         f"{r['predicted_speedup']:.2f} | {p['speedup_median']:.2f} ({p['speedup_pooled']:.2f}) | "
                         f"{h['speedup_median']:.2f} ({h['speedup_pooled']:.2f}) | {ht['speedup_median']:.2f} | "
                         f"{h['ms_per_token'] / p['ms_per_token']:.2f} | {r['mismatches'].get('potstill', 0)}, "
                         f"{r['mismatches'].get('hf_assisted', 0)} |")
    lines += ["", "Sampling (T = 1): speed-up vs target-only `sample` at T = 1", "",
              "| draft | γ | α measured | α analytic | τ | c | predicted | potstill |", "|---|" + "---:|" * 7]
    for name, d in report["drafts"].items():
        for r in d["t1"]:
            p = r["potstill"]
            lines.append(f"| {name} | {r['gamma']} | {r['alpha_measured']:.3f} | {r['alpha_analytic']:.3f} | {r['tau']:.2f} | "
                         f"{r['cost_ratio']:.3f} | {r['predicted_speedup']:.2f} | {p['speedup_median']:.2f} ({p['speedup_pooled']:.2f}) |")
    widest = max(report["settings"]["gammas"])
    lines += ["", f"Acceptance by draft position within a round at γ = {widest} (k = 1..{widest}; among rounds that reached k)",
              "", "| draft | T | " + " | ".join(f"k={k}" for k in range(1, widest + 1)) + " |", "|---|---|" + "---:|" * widest]
    for name, d in report["drafts"].items():
        for key in ("greedy", "t1"):
            row = next((r for r in d.get(key, []) if r["gamma"] == widest), None)
            if row:
                lines.append(f"| {name} | {key} | " + " | ".join(f"{a:.3f}" for a in row["alpha_by_position"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--drafts", type=Path, required=True, help="speculative_drafts.py's --out (DRAFTS/<name>/final)")
    parser.add_argument("--out", type=Path, default=Path("runs/spec/measure"))
    parser.add_argument("--only", nargs="*", default=None, help="draft names (default: every one found)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--texts", type=int, default=128, help="held-out texts for the teacher-forced α")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gammas", type=int, nargs="*", default=list(range(1, 9)))
    parser.add_argument("--temperatures", type=float, nargs="*", default=[0.0, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.target)
    target = load(args.target)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts, texts = held_out(tokenizer, args.prompts, args.texts)
    trained = json.loads((args.drafts / "drafts.json").read_text()) if (args.drafts / "drafts.json").exists() else {}
    steps = trained.get("settings", {}).get("steps")
    names = args.only or [n for n in DRAFT_ORDER if (args.drafts / n / "final").exists()]
    report = {"settings": {**vars(args), "drafts": str(args.drafts), "out": str(args.out), "threads": 1,
                           "load_before": os.getloadavg()}, "drafts": {}}
    for name in names:
        draft = load(args.drafts / name / "final")
        entry = {"train": {**trained.get(name, {}), "steps": steps}, "predicted": predicted_alpha(target, draft, texts)}
        # warm-up: first calls pay one-off costs (allocations, HF generation setup)
        for fn in methods(target, draft, prompts[0], 4, 0.0, 8, eos, pad, 0).values():
            fn()
        for temperature in args.temperatures:
            key = "greedy" if temperature == 0 else "t1"
            entry[key] = [measure_cell(target, draft, prompts, g, temperature, args.new_tokens, eos, pad) for g in args.gammas]
            print(f"{name} {key}: " + ", ".join(f"γ={r['gamma']} α={r['alpha_measured']:.3f} "
                                               f"×{r['potstill']['speedup_median']:.2f}" for r in entry[key]), flush=True)
        report["drafts"][name] = entry
        (args.out / "measure.json").write_text(json.dumps(report, indent=2))
    report["settings"]["load_after"] = os.getloadavg()
    (args.out / "measure.json").write_text(json.dumps(report, indent=2))
    text = tables(report)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
