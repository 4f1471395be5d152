"""A run's objective: a weighted sum of registered terms, written as ``"0.5*ce + 1.0*gjsd(beta=0.5)"``.

Parsed and validated when the config loads (unknown names, unknown or out-of-range hyperparameters fail
there, not mid-run). Temperature settings travel with the objective because they apply to every
teacher-target term in the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from torch import Tensor

from potstill.losses.divergences import DIVERGENCES, resolve_hparams
from potstill.losses.hparams import HParam, resolve
from potstill.losses.schedules import DtsSchedule
from potstill.registry import did_you_mean

_TERM = re.compile(r"^\s*(?:(?P<w>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[a-z_][a-z0-9_]*)\s*(?:\((?P<args>[^)]*)\))?\s*$")


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    hparams: dict[str, float]
    fn: Callable[..., Tensor]  # the registered function with its static hyperparameters bound
    uses_labels: bool
    schedule: Any = None  # mutable per-run state (e.g. TAID's t) supplying the fn's dynamic arguments
    sparse: Callable[..., Tensor] | None = None  # the term's form for sampled targets, if it has one
    token: Callable[..., Tensor] | None = None  # its form on the label token alone (sampled-token terms: opd)
    crosstok: str | None = None  # a cross-tokenizer term's kind (losses/aligned.py), None for ordinary terms

    def __call__(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        dynamic = self.schedule.current() if self.schedule is not None else {}
        return self.fn(student_logp, teacher_logp, **dynamic)

    def __str__(self) -> str:
        args = ",".join(f"{k}={v:g}" for k, v in self.hparams.items())
        return f"{self.weight:g}*{self.name}" + (f"({args})" if args else "")


@dataclass(frozen=True)
class Objective:
    terms: tuple[Term, ...]
    temperature: float = 1.0
    t_squared: bool = True  # multiply teacher-target terms by T² so gradient scale does not shrink with T
    selection: "Selection | None" = None  # token weighting applied to every term
    temperature_schedule: Any = None  # e.g. DtsSchedule; then `temperature` is only its starting value

    @property
    def needs_teacher(self) -> bool:
        return any(not t.uses_labels for t in self.terms)

    @property
    def tau(self) -> float:
        """The temperature of teacher terms for the current step."""
        if self.temperature_schedule is None:
            return self.temperature
        return self.temperature_schedule.current()["temperature"]

    @property
    def teacher_scale(self) -> float:
        return self.tau**2 if self.t_squared else 1.0

    def check_sparse_support(self, what: str) -> None:
        """Refuse (at config load) teacher terms that a sampled target cannot estimate, naming what they need."""
        self.check_label_logprobs(what)
        unsupported = [t.name for t in self.terms if not t.uses_labels and t.sparse is None]
        if unsupported:
            raise ValueError(f"{what} only supports forward-KL/CE-type terms (fkl, ce); {', '.join(unsupported)} "
                             "need the full teacher distribution: build the cache in mode 'topk' or 'dense'")

    def check_label_logprobs(self, what: str) -> None:
        """Refuse sampled-token terms (opd) for a signal that lacks the teacher's log-prob of every label token
        (top-k and sampled targets)."""
        token_terms = [t.name for t in self.terms if t.token is not None]
        if token_terms:
            raise ValueError(f"{what} lacks the teacher's log-prob of each label token, which {', '.join(token_terms)} "
                             "needs: use a live teacher, a dense cache or a server teacher with teacher.server_top_k=0")

    def check_token_support(self, what: str) -> None:
        """Refuse teacher terms that only the teacher's log-probs of the label tokens cannot serve."""
        unsupported = [t.name for t in self.terms if not t.uses_labels and t.token is None]
        if unsupported:
            raise ValueError(f"{what} gives only the teacher's log-prob of each label token, which serves opd and ce; "
                             f"{', '.join(unsupported)} need the teacher's distribution: use a live teacher, a cache "
                             "or teacher.server_top_k > 0")

    @property
    def crosstok_terms(self) -> list[str]:
        """Names of the cross-tokenizer terms (uld, gold, alm): with them the teacher may have its own tokenizer."""
        return [t.name for t in self.terms if t.crosstok is not None]

    @property
    def tracks_nll(self) -> bool:
        """Whether the loss path must report student/teacher label NLL (the temperature schedule's input)."""
        return self.temperature_schedule is not None

    def __str__(self) -> str:
        return " + ".join(map(str, self.terms))

    # ---- per-run state (schedules), updated once per optimiser step and saved in checkpoints -------------------

    def after_step(self, term_means: list[float], step: int, total_steps: int, nll_means: tuple[float, float] | None = None) -> None:
        """Advance every scheduled term with its own mean loss of the step just taken, and the temperature
        schedule with the step's gap CE_teacher − CE_student (``nll_means`` = (student, teacher))."""
        for term, value in zip(self.terms, term_means):
            if term.schedule is not None:
                term.schedule.update(value, step, total_steps)
        if self.temperature_schedule is not None and nll_means is not None:
            self.temperature_schedule.update(nll_means[1] - nll_means[0], step, total_steps)

    def scalars(self) -> dict[str, float]:
        """Current schedule values for the metrics, e.g. {'taid/t': 0.43, 'temperature': 2.1}."""
        out = {f"{t.name}/{k}": v for t in self.terms if t.schedule is not None for k, v in t.schedule.current().items()}
        return {**out, "temperature": self.tau} if self.temperature_schedule is not None else out

    def _stateful(self) -> list:
        return [t.schedule for t in self.terms] + [self.temperature_schedule]

    def state_dict(self) -> list[dict | None]:
        return [s.state_dict() if s is not None else None for s in self._stateful()]

    def load_state_dict(self, state: list[dict | None]) -> None:
        for schedule, saved in zip(self._stateful(), state):
            if schedule is not None and saved is not None:
                schedule.load_state_dict(saved)


def _split_top_level(text: str) -> list[str]:
    """Split on '+' outside parentheses ("0.5*ce + gjsd(beta=0.5)" -> two terms)."""
    return re.split(r"\+(?![^(]*\))", text)


def parse_call(text: str, what: str) -> tuple[float | None, str, dict[str, float]]:
    """'[w*]name[(k=v, ...)]' -> (w or None, name, {k: v}); errors quote the text and say what was expected."""
    m = _TERM.match(text)
    if not m:
        raise ValueError(f"cannot parse {what} {text.strip()!r}; write e.g. 'name(key=0.5)'")
    given = {}
    for arg in filter(None, (a.strip() for a in (m["args"] or "").split(","))):
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"{what} {text.strip()!r}: write hyperparameters as key=value, got {arg!r}")
        try:
            given[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{what} {text.strip()!r}: {key.strip()}={value!r} is not a number") from None
    return (float(m["w"]) if m["w"] else None), m["name"], given


def parse_term(text: str) -> Term:
    weight, name, given = parse_call(text, "objective term")
    spec = DIVERGENCES.get(name)  # raises with "did you mean"
    hparams = resolve_hparams(name, given)
    weight = 1.0 if weight is None else weight
    if weight < 0:
        raise ValueError(f"objective term {text.strip()!r}: weight must be ≥ 0")
    if spec.schedule is not None:  # static hparams configure the schedule; it supplies the fn's arguments
        return Term(name, weight, hparams, spec.fn, spec.uses_labels, spec.schedule(**hparams))
    token = None if spec.token is None else partial(spec.token, **hparams)
    return Term(name, weight, hparams, partial(spec.fn, **hparams), spec.uses_labels, None, spec.sparse, token,
                spec.crosstok)


@dataclass(frozen=True)
class Selection:
    """A registered token selector with validated hyperparameters (see losses/selection.py)."""

    name: str
    hparams: dict[str, float]

    def __str__(self) -> str:
        return f"{self.name}(" + ",".join(f"{k}={v:g}" for k, v in self.hparams.items()) + ")"


def parse_selection(text: str) -> Selection:
    from potstill.losses.selection import SELECTORS  # selection imports divergences; keep this module light

    weight, name, given = parse_call(text, "token selection")
    if weight is not None:
        raise ValueError(f"token selection {text.strip()!r} takes no weight; write e.g. 'entropy(keep=0.5)'")
    spec = SELECTORS.get(name)
    return Selection(name, resolve(f"token selector {name!r}", spec.hparams, given))


TEMPERATURE_SCHEDULES = {
    "dts": (DtsSchedule, {"t_min": HParam(2.0, 1e-3, 100.0, "lowest temperature (DTS: 2)"),
                          "t_max": HParam(4.0, 1e-3, 100.0, "highest temperature (DTS: 4)"),
                          "momentum": HParam(0.9, 0.0, 1.0, "smoothing of the temperature updates (DTS: 0.9)"),
                          "curve": HParam(1.0, 0.0, 10.0, "cosine shape: 1 = one half period over the run")}),
}


def parse_temperature_schedule(text: str | None, temperature: float):
    """'fixed' (None) or 'dts(t_min=2, t_max=4)'; loss.temperature is the schedule's starting value T0."""
    if not text or text == "fixed":
        return None
    weight, name, given = parse_call(text, "temperature schedule")
    if weight is not None or name not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"loss.temperature_schedule={text!r}: use 'fixed' or one of "
                         f"{', '.join(TEMPERATURE_SCHEDULES)}{did_you_mean(name, TEMPERATURE_SCHEDULES)}")
    cls, declared = TEMPERATURE_SCHEDULES[name]
    return cls(temperature, **resolve(f"temperature schedule {name!r}", declared, given))


def parse_objective(text: str, temperature: float = 1.0, t_squared: bool = True, select: str | None = None,
                    temperature_schedule: str | None = None) -> Objective:
    if temperature <= 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    terms = tuple(parse_term(t) for t in _split_top_level(text) if t.strip())
    if not terms:
        raise ValueError("loss.objective is empty; write e.g. 'fkl' or '0.5*ce + 0.5*fkl'")
    selection = parse_selection(select) if select else None
    if selection is not None and not any(not t.uses_labels for t in terms):
        raise ValueError("loss.select needs a teacher term in loss.objective: selectors score tokens with the teacher")
    schedule = parse_temperature_schedule(temperature_schedule, float(temperature))
    return Objective(terms, float(temperature), bool(t_squared), selection, schedule)
