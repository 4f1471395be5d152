"""Multi-teacher KD: the extra teachers (live or each with its own dense cache), their guardrails, and per batch the
one ``Mixture`` target the fused loss consumes.

The first teacher (teacher.path / teacher.cache, named teachers.name) is loaded by ``assemble`` exactly as in a
one-teacher run and its signal comes from the loop's usual path; ``attach`` adds the others. Every extra teacher is
checked against the first (and so against the student): tokenizer behaviour (``guardrails.compare_tokenizers``)
and output rows ≥ the run's vocabulary, in errors that name it. A cache must be dense (``losses/mixture.py`` says
why top-k and sampled caches cannot be mixed exactly).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from potstill import models
from potstill.builtin.arithmetic import extract_answer
from potstill.cache.format import CacheError
from potstill.cache.opening import cached_tokenizer, check_examples_cached, open_cache
from potstill.cache.reader import CacheReader
from potstill.cache.targets import batch_target
from potstill.data.encode import Example
from potstill.data.loading import load_records, record_location
from potstill.data.packing import segment_table
from potstill.guardrails import TokenizerMismatch, compare_tokenizers
from potstill.losses.chunked import chunk_slices, resolve_chunk_size
from potstill.losses.divergences import label_logprob
from potstill.losses.mixture import Mixture, dense_logprobs
from potstill.multiteacher import weights as W
from potstill.multiteacher.domains import domain_ce, domains_by_id
from potstill.multiteacher.settings import TeacherSpec, teacher_specs
from potstill.packing_check import check_packing
from potstill.precision import resolve_model_dtype
from potstill.task_eval import TaskPrompt, _greedy, _prompt_length, auto_max_new_tokens

ROUTE_FIELD = "teacher_id"


@dataclass
class Teacher:
    spec: TeacherSpec
    model: torch.nn.Module | None = None  # live: the HF model (generation, held-out scoring)
    seam: torch.nn.Module | None = None  # live extra teachers: models.HiddenAndHead (the first uses the loop's)
    reader: CacheReader | None = None  # cached extra teachers


def _who(spec: TeacherSpec) -> str:
    return f"{spec.key} (teacher '{spec.name}')"


def _check_tokenizer(first: TeacherSpec, spec: TeacherSpec, first_tok, tok, probes) -> None:
    problems = compare_tokenizers(first_tok, tok, probes, names=(f"teacher '{first.name}'", f"teacher '{spec.name}'"))
    if problems:
        raise TokenizerMismatch(f"{_who(spec)}: its tokenizer differs from teacher '{first.name}''s, so their "
                                f"distributions cannot be mixed token by token: {'; '.join(problems)}")


def _refuse_sparse_cache(spec: TeacherSpec, mode: str) -> None:
    if mode != "dense":
        raise CacheError(f"{_who(spec)}: a {mode} cache cannot be mixed exactly (another teacher's probability of an "
                         "id outside its stored ids is unknown, only their total); build it with cache.mode=dense")


def _load_live(cfg, spec: TeacherSpec, first: TeacherSpec, parts, device, probes) -> Teacher:
    path = models.resolve_model_path(spec.path)
    dtype = resolve_model_dtype(cfg.teacher.dtype, device)
    model = models.load_causal_lm(path, dtype, f"{spec.key}.path").to(device).eval().requires_grad_(False)
    _check_tokenizer(first, spec, parts.tokenizer, models.load_tokenizer(path), probes)
    rows = models.output_size(model)
    if rows < parts.vocab:
        raise ValueError(f"{_who(spec)}: its output layer has {rows} rows but the tokenizer has {parts.vocab} tokens")
    if cfg.data.packing:
        check_packing(model, spec.key)
    return Teacher(spec, model, models.HiddenAndHead(model, parts.vocab))


def _load_cached(cfg, spec: TeacherSpec, first: TeacherSpec, parts, probes) -> Teacher:
    _check_tokenizer(first, spec, parts.tokenizer, cached_tokenizer(spec.cache), probes)
    own = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=spec.cache))
    try:
        reader = open_cache(own, parts.tokenizer, parts.vocab)  # vocabulary, temperature, objective vs mode
    except CacheError as exc:
        raise CacheError(f"{_who(spec)}: {exc}") from None
    _refuse_sparse_cache(spec, reader.spec.mode)
    return Teacher(spec, reader=reader)


def attach(cfg, parts, device: torch.device, probes: list[str]):
    """``parts`` with ``parts.teachers`` set when teachers.extra lists more teachers (else unchanged)."""
    if cfg.teachers.extra is None:
        return parts
    specs = teacher_specs(cfg)
    first = specs[0]
    if parts.cache is not None:
        _refuse_sparse_cache(first, parts.cache.spec.mode)
    teachers = [Teacher(first, model=parts.teacher)]
    for spec in specs[1:]:
        if spec.cache:
            teachers.append(_load_cached(cfg, spec, first, parts, probes))
        else:
            teachers.append(_load_live(cfg, spec, first, parts, device, probes))
    parts.teachers = MultiTeacher(cfg, teachers, parts.tokenizer, parts.vocab)
    return parts


class MultiTeacher:
    """The run's teachers and the per-example weight state (DDK factors, correctness verdicts)."""

    def __init__(self, cfg, teachers: list[Teacher], tokenizer, vocab: int):
        self.cfg, self.teachers, self.tokenizer, self.vocab = cfg, teachers, tokenizer, vocab
        self.mode = cfg.teachers.mix
        self.base = torch.tensor([t.spec.weight for t in teachers], dtype=torch.float32)
        self.names = [t.spec.name for t in teachers]
        self.examples: dict[int, Example] = {}
        self.route: dict[int, int] = {}  # example id -> teacher index (teachers.mix=route)
        self.domains: list[str] = []
        self.train_domain: dict[int, int] = {}
        self.held_domain: dict[int, int] = {}
        self.factors = torch.empty(0)  # (D, K) DDK factors
        self.teacher_ce: Tensor | None = None  # (D, K) held-out CE of the (frozen) teachers, measured once
        self.correct: dict[int, Tensor] = {}  # example id -> (K,) bool: each teacher's greedy answer is right
        self.weight_sums = torch.zeros(len(teachers))  # Σ example weights since the last evaluation (logged)
        self.weight_count = 0

    # ---- before step 1 -------------------------------------------------------------------------------------------
    def bind(self, train: list[Example], held: list[Example]) -> None:
        """Index the run's examples; check the cached teachers hold every training example, every training record
        names a known teacher (route) and learn the domains (ddk). Errors name the record's file:line."""
        for t in self.teachers[1:]:
            if t.reader is not None:
                try:
                    check_examples_cached(t.reader, train)
                except CacheError as exc:
                    raise CacheError(f"{_who(t.spec)}: {exc}") from None
        privileged = next((e.example_id for e in train if e.privileged_ids is not None), None)
        if privileged is not None:
            raise ValueError(f"training example {privileged} has a privileged_context: the first teacher would read it "
                             "and the others not; several teachers need records without one")
        self.examples = {e.example_id: e for e in train}
        d = self.cfg.data
        if self.mode == "route":
            self.route = self._routes(load_records(d.train, "train", d.max_train_examples), d.train)
        if self.mode == "ddk":
            train_dom = domains_by_id(load_records(d.train, "train", d.max_train_examples), d.train)
            held_spec = d.validation or d.train
            held_dom = domains_by_id(load_records(held_spec, "validation"), held_spec)
            self.domains = sorted({train_dom[i] for i in self.examples} | {held_dom[e.example_id] for e in held})
            index = {name: i for i, name in enumerate(self.domains)}
            self.train_domain = {i: index[train_dom[i]] for i in self.examples}
            self.held_domain = {e.example_id: index[held_dom[e.example_id]] for e in held}
            self.factors = torch.full((len(self.domains), len(self.teachers)), 1.0 / len(self.teachers))

    def _routes(self, records, source: str) -> dict[int, int]:
        index = {name: k for k, name in enumerate(self.names)}
        routes = {}
        for number, record in records:
            if number not in self.examples:
                continue
            where = record_location(source, number)
            if ROUTE_FIELD not in record:
                raise ValueError(f"{where}: no '{ROUTE_FIELD}' (teachers.mix=route needs one per record; "
                                 f"teachers: {', '.join(self.names)})")
            name = record[ROUTE_FIELD]
            if not isinstance(name, str) or name not in index:
                raise ValueError(f"{where}: {ROUTE_FIELD} {name!r} is not a configured teacher "
                                 f"(teachers: {', '.join(self.names)})")
            routes[number] = index[name]
        return routes

    # ---- per batch -----------------------------------------------------------------------------------------------
    def target(self, batch: dict, temperature: float, first_signal, live_signal) -> Mixture:
        """The batch's mixture target. ``first_signal()`` is the first teacher's signal by the loop's usual path;
        ``live_signal(seam, batch)`` a live teacher's (``teacher_signal.frozen_signal``)."""
        ids = [int(i) for i in batch["example_id"].tolist()]
        shape = (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
        owner = W.example_positions(segment_table(batch).cpu(), shape)
        signal = lambda k: self._signal(k, batch, first_signal, live_signal)  # noqa: E731
        if self.mode == "confidence":
            components = [signal(k) for k in range(len(self.teachers))]
            labels = batch["labels"][:, 1:].reshape(-1).cpu()
            mean_logp = torch.stack([W.per_example_mean(self._label_logp(c, labels, temperature), labels >= 0, owner, len(ids))
                                     for c in components], -1)
            example_w = W.confidence_weights(self.base, mean_logp)
        else:
            example_w = self._example_weights(ids)
            active = (example_w > 0).any(0).tolist()
            components = [signal(k) if active[k] else None for k in range(len(self.teachers))]
        self.weight_sums += example_w.sum(0)
        self.weight_count += len(ids)
        device = batch["input_ids"].device
        return Mixture(components, W.position_log_weights(example_w, owner).to(device), self.vocab, temperature)

    def _signal(self, k: int, batch: dict, first_signal, live_signal):
        t = self.teachers[k]
        if k == 0:
            return first_signal()
        if t.reader is not None:
            return batch_target(t.reader, batch, self.vocab)
        return live_signal(t.seam, batch)

    def _label_logp(self, component, labels: Tensor, temperature: float) -> Tensor:
        """(N,) a teacher's log-prob of each label at ``temperature``, chunk by chunk (0 where unlabelled)."""
        out = torch.zeros(labels.shape)
        for sl in chunk_slices(labels.shape[0], resolve_chunk_size(0, self.vocab)):
            logp = dense_logprobs(component, sl, self.vocab, temperature)
            out[sl] = label_logprob(logp, labels[sl].to(logp.device)).cpu()
        return torch.where(labels >= 0, out, 0.0)

    def _example_weights(self, ids: list[int]) -> Tensor:
        if self.mode == "fixed":
            return W.fixed_weights(self.base, len(ids))
        if self.mode == "route":
            return W.route_weights(torch.tensor([self.route[i] for i in ids]), len(self.teachers))
        if self.mode == "ddk":
            return W.ddk_weights(self.base, self.factors, torch.tensor([self.train_domain[i] for i in ids]))
        self._judge([i for i in ids if i not in self.correct and "answer" in self.examples[i].fields])
        checkable = torch.tensor([i in self.correct for i in ids])
        correct = torch.stack([self.correct.get(i, torch.ones(len(self.teachers), dtype=torch.bool)) for i in ids])
        return W.correctness_weights(self.base, correct, checkable)

    def _judge(self, ids: list[int]) -> None:
        """Each teacher's greedy answer to these checkable examples (generated once per example, then kept)."""
        if not ids:
            return
        prompts = []
        for i in ids:
            e = self.examples[i]
            n = _prompt_length(e)
            prompts.append(TaskPrompt(i, e.input_ids[:n], e.fields["answer"], e.fields.get("task", ""), len(e.input_ids) - n))
        max_new = auto_max_new_tokens(prompts, self.cfg.eval.task_max_new_tokens)
        verdicts = []
        for t in self.teachers:
            texts, _, _ = _greedy(t.model, self.tokenizer, prompts, max_new, self.cfg.eval.batch_size)
            verdicts.append([extract_answer(text) == p.answer.strip() for text, p in zip(texts, prompts)])
        for j, i in enumerate(ids):
            self.correct[i] = torch.tensor([v[j] for v in verdicts])

    # ---- at evaluation -------------------------------------------------------------------------------------------
    def after_eval(self, student, batches: list[dict]) -> dict:
        """Mean weight per teacher since the last evaluation; with ddk, the held-out CE per domain of the student and
        the teachers, and the updated factors."""
        metrics = {f"teachers/weight/{n}": float(v) / max(self.weight_count, 1) for n, v in zip(self.names, self.weight_sums)}
        self.weight_sums, self.weight_count = torch.zeros(len(self.teachers)), 0
        if self.mode != "ddk" or not self.domains:  # no domains: evaluation only (`potstill eval`), nothing bound
            return metrics
        d = len(self.domains)
        if self.teacher_ce is None:
            self.teacher_ce = torch.stack([domain_ce(t.model, batches, self.held_domain, d, self.vocab)
                                           for t in self.teachers], -1).float()
        student_ce = domain_ce(student, batches, self.held_domain, d, self.vocab).float()
        measured = ~student_ce.isnan() & ~self.teacher_ce.isnan().any(-1)
        updated = W.ddk_update(self.factors, student_ce, self.teacher_ce.clamp_min(1e-6), self.cfg.teachers.ddk_smoothing)
        self.factors = torch.where(measured[:, None], updated, self.factors)
        for di, domain in enumerate(self.domains):
            metrics[f"teachers/ce/{domain}/student"] = float(student_ce[di])
            for k, name in enumerate(self.names):
                metrics[f"teachers/ce/{domain}/{name}"] = float(self.teacher_ce[di, k])
                metrics[f"teachers/ddk/{domain}/{name}"] = float(self.factors[di, k])
        return metrics

    def state_dict(self) -> dict:
        return {"domains": self.domains, "factors": self.factors.tolist()}

    def load_state_dict(self, state: dict | None) -> None:
        if state and state["domains"] == self.domains and state["factors"]:
            self.factors = torch.tensor(state["factors"], dtype=torch.float32)
