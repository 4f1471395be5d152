"""What the loop feeds ``train.train_step`` under `data.regime` and `teacher.self_distill`: the data's micro-batches,
or student rollouts of their prompts (with probability λ per step, or DistiLLM's replay), each with the teacher's
privileged view when its examples carry one; plus the rollout metrics, the EMA teacher's update and the state a
checkpoint needs (the λ stream, the replay buffer and φ, the EMA weights)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from torch import nn

from potstill import runtime
from potstill.onpolicy.guards import resolve_eos_ids
from potstill.onpolicy.replay import FRESH, OFFLINE, REPLAY, Replay
from potstill.onpolicy.rollouts import RolloutStats, roll_out, rollout_seed
from potstill.onpolicy.self_distill import LiveTeacher, ema_update, with_teacher_view
from potstill.sampling import SamplingSettings

LAMBDA_STREAM = 0x5EED_1A  # the λ stream's seed is (train.seed, this): independent of every other stream


@dataclass
class Regime:
    cfg: object
    rt: runtime.Runtime
    student: nn.Module  # the unwrapped student (rollouts and the EMA read it directly)
    amp: object
    pad_id: int
    bos_id: int | None
    eos_ids: list[int] = field(default_factory=list)
    privileged: dict[int, list[int]] = field(default_factory=dict)  # example id → privileged-context ids
    ema_teacher: nn.Module | None = None
    replay: Replay | None = None
    lam_rng: random.Random = field(default_factory=random.Random)
    # the current step's record, read by ``metrics``
    mode: str = OFFLINE
    rollout_seconds: float = 0.0
    stats: RolloutStats = field(default_factory=RolloutStats)

    @property
    def onpolicy(self) -> bool:
        return self.cfg.data.regime == "onpolicy"

    def settings(self) -> SamplingSettings:
        o = self.cfg.onpolicy
        return SamplingSettings(o.max_new_tokens, o.temperature, o.top_p)

    def draw_mode(self, step: int, rows_needed: int) -> str:
        """This step's source of completions; one λ draw per step, the same on every rank."""
        if not self.onpolicy:
            return OFFLINE
        u = self.lam_rng.random()
        if self.replay is not None:
            return self.replay.mode(u, step, self.cfg.train.max_steps, rows_needed)
        return FRESH if u < self.cfg.onpolicy.lam else OFFLINE

    def prepare(self, step: int, micro: list[dict]) -> list[dict]:
        """The micro-batches step ``step`` (0-based) trains on."""
        self.mode, self.rollout_seconds, self.stats = self.draw_mode(step, len(micro[0]["example_id"])), 0.0, RolloutStats()
        if self.mode != OFFLINE:
            started = time.perf_counter()
            micro = [self._generated(step, i, b) for i, b in enumerate(micro)]
            self.rollout_seconds = time.perf_counter() - started
        return [with_teacher_view(b, self.privileged, self.bos_id) for b in micro] if self.privileged else micro

    def _generated(self, step: int, index: int, batch: dict) -> dict:
        seed = rollout_seed(self.cfg.train.seed, step, self.rt.rank, index)
        if self.mode == REPLAY:
            rollout = self.replay.draw(len(batch["example_id"]), seed)
        else:
            rollout = roll_out(self.student, batch, self.settings(), eos_ids=self.eos_ids, pad_id=self.pad_id,
                               bos_id=self.bos_id, prompt_tokens=self.cfg.onpolicy.prompt_tokens, seed=seed,
                               autocast=self.amp.autocast())
            if self.replay is not None:
                self.replay.push(rollout)
        self.stats.add(rollout, self.cfg.onpolicy.max_new_tokens)
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in rollout.batch(self.pad_id).items()}

    def metrics(self, step_seconds: float) -> dict[str, float]:
        """The train row's rollout metrics (on-policy runs only); collective: every rank calls it."""
        if not self.onpolicy:
            return {}
        row = {"rollout/on_policy": float(self.mode != OFFLINE),
               "rollout/seconds_share": self.rollout_seconds / max(step_seconds, 1e-12)}
        if self.replay is not None:
            row.update({"rollout/replayed": float(self.mode == REPLAY), "rollout/phi": self.replay.phi})
        if self.mode != OFFLINE:
            row.update(RolloutStats.metrics(self.rt.all_reduce_sum(self.stats.tensor())))
        return row

    def after_step(self) -> None:
        """After every optimiser step that updated the student: the EMA teacher follows it."""
        if self.ema_teacher is not None:
            ema_update(self.ema_teacher, self.student, self.cfg.teacher.ema_decay)

    def after_eval(self, row: dict) -> None:
        if self.replay is not None:
            self.replay.after_eval(float(row["student_ce"]))

    def state_dict(self) -> dict:
        """Collective (gathers every rank's replay buffer)."""
        rows = self.rt.gather_objects(list(self.replay.rows)) if self.replay is not None else None
        return {"lambda_rng": self.lam_rng.getstate(), "replay": None if self.replay is None else self.replay.shared_state(),
                "replay_rows": rows, "ema": None if self.ema_teacher is None else self.ema_teacher.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.lam_rng.setstate(state["lambda_rng"])
        if self.replay is not None:
            rows = state["replay_rows"]  # saved under another rank count: the buffers start empty
            self.replay.load(state["replay"], rows[self.rt.rank] if len(rows) == self.rt.world_size else None)
        if self.ema_teacher is not None:
            self.ema_teacher.load_state_dict(state["ema"])


def check_rollout_length(cfg, student, privileged: dict, longest_example: int) -> None:
    """Rows that grow beyond the data (rollouts, a teacher view with the privileged context) must still fit the
    student's positions: past them a learned position table fails and RoPE extrapolates silently."""
    context = getattr(student.config, "max_position_embeddings", None)
    new_tokens = cfg.onpolicy.max_new_tokens if cfg.data.regime == "onpolicy" else 0
    longest = longest_example + new_tokens + max((len(p) for p in privileged.values()), default=0)
    if context is not None and (new_tokens or privileged) and longest > context:
        raise ValueError(f"rows may reach {longest} tokens (the longest training example, {longest_example}, + "
                         f"onpolicy.max_new_tokens {new_tokens} + the longest privileged_context), beyond the student's "
                         f"{context} positions; lower data.max_length or onpolicy.max_new_tokens")


def check_privileged_data(cfg, parts, privileged: dict, n_examples: int) -> None:
    """Before anything is written: records' privileged_context must reach a teacher that reads it, and a
    self-distilling student needs some (without, its own copy teaches it nothing)."""
    source = "teacher.cache" if parts.cache is not None else "teacher.server_url" if parts.server is not None else None
    if privileged and source:
        raise ValueError(f"{len(privileged)} training records carry privileged_context, which a teacher from {source} "
                         "cannot read; use a live teacher (teacher.path) or teacher.self_distill, or drop the field")
    if privileged and getattr(parts, "hidden", None) is not None:
        raise ValueError(f"{len(privileged)} training records carry privileged_context: the teacher would read other "
                         "rows than the student, whose hidden states hidden.* pairs position by position; drop the "
                         "field or the hidden.* weights")
    if privileged and cfg.data.packing:
        raise ValueError("records with privileged_context give the teacher its own rows, which data.packing cannot "
                         "pack; set data.packing=false")
    if cfg.teacher.self_distill != "none" and not privileged:
        raise ValueError(f"teacher.self_distill={cfg.teacher.self_distill}: none of the {n_examples} training records "
                         "has a privileged_context, so the teacher would read exactly what the student reads; add the "
                         "field (e.g. the reference solution) to the records")


def build(cfg, rt: runtime.Runtime, parts, par, amp, train_examples) -> Regime:
    """The run's regime, after every check; with teacher.self_distill=live the student's own seam becomes
    ``par.teacher``."""
    tok = parts.tokenizer
    privileged = {e.example_id: e.privileged_ids for e in train_examples if e.privileged_ids}
    check_privileged_data(cfg, parts, privileged, len(train_examples))
    check_rollout_length(cfg, parts.student, privileged, max(len(e.input_ids) for e in train_examples))
    regime = Regime(cfg, rt, parts.student, amp, tok.pad_token_id, tok.bos_token_id, privileged=privileged,
                    ema_teacher=parts.teacher if cfg.teacher.self_distill == "ema" else None,
                    lam_rng=random.Random(f"{cfg.train.seed}/{LAMBDA_STREAM}"))
    if cfg.teacher.self_distill == "live":
        par.teacher = LiveTeacher(parts.student, parts.vocab)
    if regime.onpolicy:
        regime.eos_ids = resolve_eos_ids(cfg, parts.student, tok, parts.vocab, train_examples)
        if cfg.onpolicy.replay:
            regime.replay = Replay(cfg.onpolicy.replay_capacity, cfg.onpolicy.replay_steps, cfg.onpolicy.lam)
    return regime
