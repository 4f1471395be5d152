"""The `onpolicy` section (`OnPolicyConfig`) and the config-time checks of `data.regime`, `onpolicy.*` and
`teacher.self_distill` (one line each)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OnPolicyConfig:
    lam: float = 1.0
    """GKD's λ: each step, with this probability the step's completions are sampled from the student (else the data's own are used); 1 = fully on-policy. Drawn from a seeded stream of its own, the same on every rank."""
    max_new_tokens: int = 64
    """Most tokens a rollout adds after its prompt (a row that reaches it without EOS is counted as truncated)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts (1 = the full distribution)."""
    prompt_tokens: int = 8
    """`text` records have no prompt: a rollout continues their BOS + this many first tokens."""
    eos_tokens: list | None = None
    """Token ids (or token strings) that end a rollout; None = the student's generation_config / config / tokenizer EOS ids, which must be the tokens the data's completions end with (checked before step 1)."""
    replay: bool = False
    """DistiLLM's adaptive off-policy: onpolicy.lam becomes the initial probability φ of a student-generated step; a step generates fresh rollouts (kept in a replay buffer) with probability φ·(1 − step/max_steps), replays the buffer with probability φ·step/max_steps, else trains on the data; φ grows by 1/onpolicy.replay_steps at each evaluation whose held-out CE rose (docs/onpolicy.md)."""
    replay_capacity: int = 1000
    """Rollouts (rows) the replay buffer keeps per rank (the oldest are dropped)."""
    replay_steps: int = 10
    """N_φ of DistiLLM: φ grows by 1/N_φ (up to 1) at each evaluation whose held-out CE is worse than the previous one."""


REGIMES = ("offline", "onpolicy")
SELF_DISTILL = ("none", "frozen", "ema", "live")


def check_settings(cfg) -> None:
    d, o, t = cfg.data, cfg.onpolicy, cfg.teacher
    if d.regime not in REGIMES:
        raise ValueError(f"data.regime={d.regime!r}: use offline or onpolicy")
    if t.self_distill not in SELF_DISTILL:
        raise ValueError(f"teacher.self_distill={t.self_distill!r}: use none, frozen, ema or live")
    if not 0 <= t.ema_decay < 1:
        raise ValueError(f"teacher.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.self_distill != "none":
        _check_self_distill(cfg)
    if d.regime == "onpolicy":
        _check_onpolicy(cfg)
    _check_sampled_token_terms(cfg)


def _check_sampled_token_terms(cfg) -> None:
    """Sampled-token terms (opd) estimate KL(q‖p) only on tokens the student sampled: every step must roll out
    (λ = 1) from a sampler with a density (temperature > 0), so that ρ = q/q_sampler is defined."""
    names = [t.name for t in cfg.objective().terms if t.token is not None]
    if not names:
        return
    what = f"loss.objective term {', '.join(names)} (sampled-token distillation)"
    if cfg.data.regime != "onpolicy" or cfg.onpolicy.lam < 1:
        raise ValueError(f"{what} estimates KL(student‖teacher) on the student's own samples: set data.regime=onpolicy "
                         "and onpolicy.lam=1 (for the data's tokens use rkl, or fkl)")
    if cfg.onpolicy.temperature == 0:
        raise ValueError(f"{what} needs a sampler with a density for its importance weight: set onpolicy.temperature > 0")


def _check_self_distill(cfg) -> None:
    t = cfg.teacher
    if t.path or t.cache:
        raise ValueError(f"teacher.self_distill={t.self_distill}: the student is its own teacher; unset teacher.path "
                         "and teacher.cache")
    if t.self_distill in ("ema", "live") and cfg.parallel.strategy == "fsdp":
        raise ValueError(f"teacher.self_distill={t.self_distill} with parallel.strategy=fsdp: the teacher would read "
                         "the student's shards; use parallel.strategy=ddp")


def _check_onpolicy(cfg) -> None:
    o = cfg.onpolicy
    if cfg.teacher.cache:
        raise ValueError("data.regime=onpolicy with teacher.cache: a cache cannot score the student's new tokens; "
                         "use a live teacher (teacher.path) or teacher.self_distill")
    if cfg.data.packing:
        raise ValueError("data.regime=onpolicy with data.packing: rollout batches are padded; set data.packing=false")
    if cfg.parallel.strategy == "fsdp":
        raise ValueError("data.regime=onpolicy with parallel.strategy=fsdp: ranks stop generating at different "
                         "steps, which FSDP's per-layer collectives cannot follow; use parallel.strategy=ddp")
    if not 0 <= o.lam <= 1:
        raise ValueError(f"onpolicy.lam must be in [0, 1], got {o.lam}")
    if o.prompt_tokens < 0:
        raise ValueError(f"onpolicy.prompt_tokens must be ≥ 0, got {o.prompt_tokens}")
    if o.replay and (o.replay_capacity < 1 or o.replay_steps < 1):
        raise ValueError(f"onpolicy.replay_capacity and onpolicy.replay_steps must be ≥ 1, got "
                         f"{o.replay_capacity} and {o.replay_steps}")
    if o.eos_tokens is not None and not (o.eos_tokens and all(isinstance(e, (int, str)) and not isinstance(e, bool)
                                                              for e in o.eos_tokens)):
        raise ValueError(f"onpolicy.eos_tokens must be a non-empty list of token ids or token strings, got {o.eos_tokens}")
    from potstill.sampling import SamplingSettings

    SamplingSettings(o.max_new_tokens, o.temperature, o.top_p).check("onpolicy")
