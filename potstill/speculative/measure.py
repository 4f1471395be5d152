"""`potstill speculate`'s measurement: every prompt (batch 1) decoded by target-only decoding, draft-only decoding
(for the cost ratio c), potstill's speculative decoder at each γ (and adaptive γ), and HF assisted generation at
each γ; wall-clock per prompt, then the per-γ numbers of the report (``summarise``), as plain JSON-able data.

Definitions (docs/speculative.md): tokens/s = all new tokens ÷ all wall-clock seconds of a method; speed-up = its
tokens/s ÷ target-only tokens/s (the same prompts); τ = committed tokens ÷ target verification calls, the bonus /
correction token counted; c = draft-only seconds per token ÷ target-only seconds per token (plain decoding).
"""
from __future__ import annotations

import logging
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from potstill.evaluate import _private_rng, evaluate
from potstill.sampling import SamplingSettings, sample
from potstill.speculative.acceptance import predicted_speedup, tokens_per_call
from potstill.speculative.inputs import Inputs, MeasureSettings

log = logging.getLogger("potstill")


@dataclass
class Decoded:
    """One prompt decoded by one method."""

    tokens: list[int]
    seconds: float
    spec: object | None = None  # SpeculativeResult of potstill's decoder
    target_calls: int | None = None  # HF assisted: target forwards, counted by a hook


@dataclass(frozen=True)
class Method:
    key: str  # "target", "draft", "potstill:4", "potstill:adaptive", "hf:4"
    run: Callable[[list[int], int], Decoded]  # (prompt ids, seed) → Decoded with seconds = 0 (timed by the caller)


def clock(device: torch.device) -> float:
    """``time.perf_counter`` after the device's queued work has finished (asynchronous CUDA kernels)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ---- the decoding methods --------------------------------------------------------------------------------------


def plain(model, inputs: Inputs, settings: MeasureSettings) -> Callable[[list[int], int], Decoded]:
    """``model`` alone through the one KV-cached rollout routine (``sampling.sample``), batch 1."""
    sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p)

    def run(ids: list[int], seed: int) -> Decoded:
        out = sample(model, [ids], sampling, eos_ids=inputs.eos, pad_id=inputs.pad, seed=seed)
        return Decoded(out.tokens[0], 0.0)

    return run


def speculative(inputs: Inputs, settings: MeasureSettings, gamma: int | None) -> Callable[[list[int], int], Decoded]:
    """potstill's decoder at a fixed γ, or adaptive γ when ``gamma`` is None (its own first γ and γ_max)."""
    from potstill.speculative.decode import SpeculativeSettings, speculate

    fixed = {"gamma": gamma} if gamma is not None else {"adaptive": True}
    spec_settings = SpeculativeSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                        top_p=settings.top_p, **fixed)
    spec_settings.check()

    def run(ids: list[int], seed: int) -> Decoded:
        result = speculate(inputs.target, inputs.draft, ids, spec_settings, eos_ids=inputs.eos, seed=seed)
        return Decoded(list(result.tokens), 0.0, spec=result)

    return run


@contextmanager
def fixed_assistant_gamma(draft, gamma: int) -> Iterator[None]:
    """HF assisted generation reads γ from the *assistant's* generation config (``AssistedCandidateGenerator``;
    the same names passed to ``generate`` would only set the target's): γ candidates every round, no heuristic
    schedule, no confidence-threshold early stop. Restored afterwards."""
    config = draft.generation_config
    wanted = {"num_assistant_tokens": gamma, "num_assistant_tokens_schedule": "constant",
              "assistant_confidence_threshold": 0.0}
    saved = {key: getattr(config, key, None) for key in wanted}
    for key, value in wanted.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def hf_assisted(inputs: Inputs, settings: MeasureSettings, gamma: int) -> Callable[[list[int], int], Decoded]:
    """``target.generate(assistant_model=draft)`` at a fixed γ; sampling draws from a private seeded RNG
    (``top_k=0``: HF's default top-k of 50 would change the distribution)."""
    sampled = settings.temperature > 0
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0} \
        if sampled else {"do_sample": False}
    calls = [0]

    def count_call(module, args, kwargs) -> None:
        calls[0] += 1

    def run(ids: list[int], seed: int) -> Decoded:
        input_ids = torch.tensor([ids], device=inputs.device)
        calls[0] = 0
        handle = inputs.target.register_forward_pre_hook(count_call, with_kwargs=True)
        try:
            with torch.no_grad(), fixed_assistant_gamma(inputs.draft, gamma), _private_rng(inputs.device, seed):
                out = inputs.target.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                             assistant_model=inputs.draft, max_new_tokens=settings.max_new_tokens,
                                             eos_token_id=inputs.eos, pad_token_id=inputs.pad, **sampling)
        finally:
            handle.remove()
        return Decoded(out[0, len(ids):].tolist(), 0.0, target_calls=calls[0])

    return run


def methods(inputs: Inputs, settings: MeasureSettings) -> list[Method]:
    out = [Method("target", plain(inputs.target, inputs, settings)), Method("draft", plain(inputs.draft, inputs, settings))]
    out += [Method(f"potstill:{g}", speculative(inputs, settings, g)) for g in settings.gammas]
    if settings.adaptive:
        out.append(Method("potstill:adaptive", speculative(inputs, settings, None)))
    if settings.hf_assisted:
        out += [Method(f"hf:{g}", hf_assisted(inputs, settings, g)) for g in settings.gammas]
    return out


# ---- timing ----------------------------------------------------------------------------------------------------


def time_methods(inputs: Inputs, settings: MeasureSettings, chosen: list[Method]) -> dict[str, list[Decoded]]:
    """Warm-up decodes of the first prompt (untimed), then every prompt by every method in turn (interleaved, so
    a slow spell of a shared machine falls on all methods alike). Prompt i is sampled with seed ``seed + i``."""
    for method in chosen:
        for _ in range(settings.warmup):
            method.run(inputs.prompt_ids[0], settings.seed)
    runs: dict[str, list[Decoded]] = {m.key: [] for m in chosen}
    for i, ids in enumerate(inputs.prompt_ids):
        for method in chosen:
            start = clock(inputs.device)
            decoded = method.run(ids, settings.seed + i)
            decoded.seconds = clock(inputs.device) - start
            runs[method.key].append(decoded)
        if (i + 1) % 8 == 0 or i + 1 == len(inputs.prompt_ids):
            log.info("speculate: %d/%d prompts decoded by %d methods", i + 1, len(inputs.prompt_ids), len(chosen))
    return runs


# ---- held-out α ------------------------------------------------------------------------------------------------


def held_out_alpha(inputs: Inputs, settings: MeasureSettings) -> dict | None:
    """The α predicted from teacher-forced held-out data (--eval-data): evaluate's acceptance_alpha, the mean over
    labelled positions of Σ_v min(p, q) = 1 − TVD between the target's and the draft's next-token distributions
    after the decoding's temperature and top-p (greedy: the argmax agreement)."""
    if not inputs.eval_batches:
        return None
    metrics = evaluate(inputs.draft, inputs.eval_batches, teacher=inputs.target, vocab=inputs.vocab,
                       acceptance_temperature=settings.temperature, acceptance_top_p=settings.top_p).metrics
    return {"alpha": metrics["acceptance_alpha"], "metric": "acceptance_alpha", "tokens": metrics["tokens"],
            "top1_agreement": metrics["top1_agreement"], "data": settings.eval_data}


# ---- the report's numbers --------------------------------------------------------------------------------------


def throughput(decoded: list[Decoded]) -> dict:
    tokens, seconds = sum(len(d.tokens) for d in decoded), sum(d.seconds for d in decoded)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("nan")}


def mismatches(decoded: list[Decoded], reference: list[Decoded]) -> int:
    """Prompts whose output differs from the reference's (greedy: target-only decoding)."""
    return sum(d.tokens != r.tokens for d, r in zip(decoded, reference))


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def speculative_row(gamma: int | None, runs: dict[str, list[Decoded]], cost_ratio: float,
                    held_alpha: float | None, greedy: bool) -> dict:
    """One table row: potstill's decoder at ``gamma`` (None = adaptive) beside the baseline and HF at that γ."""
    key = f"potstill:{gamma if gamma is not None else 'adaptive'}"
    decoded, target = runs[key], runs["target"]
    results = [d.spec for d in decoded]
    proposed, accepted = sum(r.proposed for r in results), sum(r.accepted for r in results)
    verified, calls = sum(r.verified for r in results), sum(r.target_calls for r in results)
    speed = throughput(decoded)
    alpha = _ratio(accepted, verified)
    row = {"gamma": gamma, "method": key, "proposed": proposed, "accepted": accepted, "verified": verified,
           "target_calls": calls, "acceptance_rate": _ratio(accepted, proposed), "alpha_measured": alpha,
           "alpha_analytic": _ratio(sum(r.expected_accepted for r in results), verified),
           "tau": _ratio(speed["tokens"], calls), "mean_gamma": _ratio(proposed, sum(len(r.rounds) for r in results)),
           **speed, "speedup": _ratio(speed["tokens_per_s"], throughput(target)["tokens_per_s"]),
           "draft_seconds": sum(r.draft_seconds for r in results),
           "target_seconds": sum(r.target_seconds for r in results),
           "greedy_mismatches": mismatches(decoded, target) if greedy else None}
    if gamma is not None:
        row.update(_predictions(alpha, gamma, cost_ratio, held_alpha))
        row.update(_hf_columns(runs.get(f"hf:{gamma}"), speed["tokens_per_s"], target, greedy))
    return row


def _predictions(alpha: float, gamma: int, cost_ratio: float, held_alpha: float | None) -> dict:
    known = alpha == alpha  # not NaN (nothing verified)
    out = {"tau_predicted": tokens_per_call(alpha, gamma) if known else None,
           "speedup_predicted": predicted_speedup(alpha, gamma, cost_ratio) if known else None}
    if held_alpha is not None:
        out["tau_predicted_held_out"] = tokens_per_call(held_alpha, gamma)
        out["speedup_predicted_held_out"] = predicted_speedup(held_alpha, gamma, cost_ratio)
    return out


def _hf_columns(hf: list[Decoded] | None, tokens_per_s: float, target: list[Decoded], greedy: bool) -> dict:
    if hf is None:
        return {}
    speed = throughput(hf)
    return {"hf_tokens_per_s": speed["tokens_per_s"], "hf_tau": _ratio(speed["tokens"], sum(d.target_calls for d in hf)),
            "speedup_vs_hf": _ratio(tokens_per_s, speed["tokens_per_s"]),
            "hf_greedy_mismatches": mismatches(hf, target) if greedy else None}


def environment(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def summarise(inputs: Inputs, settings: MeasureSettings, runs: dict[str, list[Decoded]], held: dict | None) -> dict:
    """results.json's content: settings, models, environment, baselines, one row per γ, per-prompt timings."""
    target, draft = throughput(runs["target"]), throughput(runs["draft"])
    # seconds per token of each model decoding alone: the draft/target cost ratio of the speed-up formula
    cost_ratio = _ratio(draft["seconds"] / max(draft["tokens"], 1), target["seconds"] / max(target["tokens"], 1))
    greedy = settings.temperature == 0
    held_alpha = held["alpha"] if held else None
    gammas: list[int | None] = list(settings.gammas) + ([None] if settings.adaptive else [])
    return {
        "settings": settings.as_dict(),
        "models": {"target": inputs.target_path, "draft": inputs.draft_path, "target_parameters": _size(inputs.target),
                   "draft_parameters": _size(inputs.draft), "vocab": inputs.vocab},
        "environment": environment(inputs.device),
        "prompts": len(inputs.prompt_ids),
        "baselines": {"target": target, "draft": draft, "cost_ratio": cost_ratio},
        "held_out": held,
        "rows": [speculative_row(g, runs, cost_ratio, held_alpha, greedy) for g in gammas],
        "per_prompt": {key: [_prompt_record(n, d) for n, d in zip(inputs.prompt_numbers, decoded)]
                       for key, decoded in runs.items()},
    }


def _prompt_record(number: int, decoded: Decoded) -> dict:
    record = {"prompt": number, "tokens": len(decoded.tokens), "seconds": decoded.seconds}
    if decoded.spec is not None:
        record.update(target_calls=decoded.spec.target_calls, rounds=[list(r) for r in decoded.spec.rounds])
    elif decoded.target_calls is not None:
        record["target_calls"] = decoded.target_calls
    return record


def _size(model) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(settings: MeasureSettings, inputs: Inputs) -> dict:
    """Decode, time and summarise (inputs from ``inputs.load_inputs``, already checked)."""
    held = held_out_alpha(inputs, settings)
    runs = time_methods(inputs, settings, methods(inputs, settings))
    return summarise(inputs, settings, runs, held)
