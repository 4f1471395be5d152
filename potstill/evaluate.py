"""Evaluation of a student (and its distance to a teacher) without ever building a B·T·V logits tensor.

Hidden states come from the decoder body; only the labelled positions are kept, and both models' logits are
projected chunk by chunk over those same positions (``project_chunks``), so peak extra memory is O(chunk × V).
Every metric is a running sum over chunks, divided once at the end: the numbers do not depend on chunk size.

With a teacher, acceptance_alpha = token-mean Σ_v min(p, q) is the speculative-sampling acceptance probability of
the student as a draft for the teacher (``speculative.acceptance.expected_acceptance``), with both distributions
after the decoding's sampling transform (``sampling.sampling_logprobs``: temperature, top-p; temperature 0 is
greedy, where it is the argmax agreement).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from potstill.crosstok.bpb import TOKEN_BYTES, bits_per_byte
from potstill.labels import IGNORE_INDEX
from potstill.losses.chunked import project_chunks
from potstill.losses.divergences import kl, label_logprob
from potstill.models import hidden_states, output_head
from potstill.sampling import SamplingSettings, sampling_logprobs
from potstill.speculative.acceptance import expected_acceptance

ECE_BINS = 15


# ---- calibration -----------------------------------------------------------------------------------------------


class CalibrationBins:
    """Running per-bin sums for expected calibration error, so evaluation streams over chunks.

    Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 goes to bin 0.
    """

    def __init__(self, n_bins: int = ECE_BINS):
        if n_bins < 1:
            raise ValueError(f"n_bins must be ≥ 1, got {n_bins}")
        self.n_bins = n_bins
        # float64 sums: millions of tokens of float32 confidences would otherwise lose digits.
        self.confidence_sum = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,)
        self.correct_sum = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,)
        self.count = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,)

    def bin_index(self, confidence: Tensor) -> Tensor:
        """(n,) bin ids. ``bucketize`` with right=False gives exactly the (lo, hi] rule against the edges i/n."""
        inner_edges = torch.arange(1, self.n_bins, dtype=torch.float64, device=confidence.device) / self.n_bins
        return torch.bucketize(confidence.double(), inner_edges, right=False)

    def add(self, confidence: Tensor, correct: Tensor) -> None:
        """confidence (n,) in [0, 1]; correct (n,) bool. Sums stay on the inputs' device until ``result``."""
        confidence, correct = confidence.reshape(-1), correct.reshape(-1)
        if confidence.shape != correct.shape:
            raise ValueError(f"confidence has {confidence.numel()} entries but correct {correct.numel()}")
        if self.count.device != confidence.device:
            self._move_to(confidence.device)
        idx = self.bin_index(confidence)
        self.confidence_sum.index_add_(0, idx, confidence.double())
        self.correct_sum.index_add_(0, idx, correct.double())
        self.count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def _move_to(self, device: torch.device) -> None:
        self.confidence_sum, self.correct_sum, self.count = (t.to(device) for t in (self.confidence_sum, self.correct_sum, self.count))

    def result(self) -> tuple[float, list[list[float]]]:
        """(ECE, per-bin [mean_confidence, accuracy, count]); empty bins are [bin_center, 0.0, 0].

        ECE = Σ_b (n_b / N)·|acc_b − conf_b|; NaN when nothing was added.
        """
        conf, corr, count = (t.cpu().tolist() for t in (self.confidence_sum, self.correct_sum, self.count))
        total = sum(count)
        ece = 0.0 if total else float("nan")
        bins = []
        for i, (c, a, n) in enumerate(zip(conf, corr, count)):
            if n == 0:
                bins.append([(i + 0.5) / self.n_bins, 0.0, 0])
                continue
            mean_conf, accuracy = c / n, a / n
            ece += n / total * abs(accuracy - mean_conf)
            bins.append([mean_conf, accuracy, int(n)])
        return ece, bins


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> tuple[float, list[list[float]]]:
    """Standard equal-width-bin ECE of (n,) confidences against (n,) correctness; see ``CalibrationBins``."""
    bins = CalibrationBins(n_bins)
    bins.add(confidence, correct)
    return bins.result()


# ---- evaluation over batches -----------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: dict[str, float]  # student_ce, student_ppl, ece, tokens (+ teacher_ce, teacher_ppl, kl_teacher_student, top1_agreement, acceptance_alpha; golden_kl_*; bpb, teacher_bpb, bytes)
    calibration: list[list[float]] = field(default_factory=list)  # per bin: [mean_confidence, accuracy, count]


@dataclass
class _Totals:
    """Running sums over valid positions; float64 tensors on the student's device (one host sync at the end)."""

    tokens: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    bytes_known: bool = True  # every batch carried token_bytes (else no bits per byte)
    calibration: CalibrationBins = field(default_factory=CalibrationBins)

    def add(self, name: str, per_token: Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + per_token.double().sum()

    def mean(self, name: str) -> float:
        return float(self.sums[name]) / self.tokens if self.tokens else float("nan")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode inside; each model's own train/eval mode restored after (training continues unchanged)."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, was_training in zip(present, modes):
            m.train(was_training)


def _valid_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, valid: Tensor) -> Tensor:
    """Hidden states (n_valid, H) of the positions that predict a label: hidden[:, :-1] scored against labels[:, 1:]."""
    device = _device(model)
    mask = None if attention_mask is None else attention_mask.to(device)
    hidden = hidden_states(model, input_ids.to(device), mask)  # (B, T, H)
    return hidden[:, :-1][valid.to(device)]  # (n_valid, H)


def _decoding_logp(logits: Tensor, logp: Tensor, decoding: SamplingSettings) -> Tensor:
    """(n, V) log-probs tokens are drawn from under ``decoding``; plain sampling is ``logp`` itself."""
    plain = decoding.temperature == 1 and decoding.top_p == 1
    return logp if plain else sampling_logprobs(logits, decoding)


def _score_chunk(totals: _Totals, z_student: Tensor, labels: Tensor, z_teacher: Tensor | None,
                 true_logp: Tensor | None = None, decoding: SamplingSettings = SamplingSettings()) -> None:
    """One chunk: z_student (n, V) fp32, labels (n,), z_teacher (n, V) fp32 or None, true_logp (n, V) the true
    next-token log-probs (golden metrics) or None; ``decoding`` the sampling acceptance_alpha is measured for."""
    logq = F.log_softmax(z_student, -1)  # (n, V)
    totals.add("student_ce", -label_logprob(logq, labels))
    max_logq, predicted = logq.max(-1)  # (n,), (n,)
    totals.calibration.add(max_logq.exp(), predicted == labels)
    if true_logp is not None:
        totals.add("golden_kl_student", kl(true_logp, logq))  # KL(true‖student): sums over true prob > 0 only
    if z_teacher is not None:
        logp = F.log_softmax(z_teacher, -1)  # (n, V)
        totals.add("teacher_ce", -label_logprob(logp, labels))
        totals.add("kl_teacher_student", kl(logp, logq))  # KL(p‖q) at T = 1, -inf-safe
        totals.add("top1_agreement", predicted == logp.argmax(-1))
        totals.add("acceptance_alpha", expected_acceptance(_decoding_logp(z_student, logq, decoding),
                                                           _decoding_logp(z_teacher, logp, decoding)))
        if true_logp is not None:
            totals.add("golden_kl_teacher", kl(true_logp, logp))


def _score_batch(totals: _Totals, student, teacher, batch: dict, vocab: int, chunk_size: int, golden=None,
                 decoding: SamplingSettings = SamplingSettings()) -> None:
    labels = batch["labels"][:, 1:]  # (B, T-1): the label each position t-1 predicts
    valid = labels != IGNORE_INDEX  # (B, T-1)
    n_valid = int(valid.sum())
    if n_valid == 0:
        return  # nothing to score: skip both forward passes
    device = _device(student)
    targets = labels[valid].to(device)  # (n_valid,)
    if int(targets.max()) >= vocab or int(targets.min()) < 0:
        raise ValueError(f"labels must lie in [0, {vocab}) or be {IGNORE_INDEX}; got range [{int(targets.min())}, {int(targets.max())}]")
    if TOKEN_BYTES in batch:  # the UTF-8 bytes each labelled token stands for (crosstok/bpb.py)
        totals.add("bytes", batch[TOKEN_BYTES][:, 1:][valid])
    else:
        totals.bytes_known = False
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    student_chunks = project_chunks(_valid_hidden(student, ids, mask, valid), *output_head(student, vocab), chunk_size)
    golden_rows = None if golden is None else golden.positions(batch["example_id"], valid)  # (n_valid,)

    def truth(sl: slice) -> Tensor | None:
        return None if golden_rows is None else golden.rows(golden_rows[sl]).to(device)

    if teacher is None:
        for sl, z_s in student_chunks:
            _score_chunk(totals, z_s, targets[sl], None, truth(sl))
    else:
        # Same positions, same chunk_size -> the two generators yield the same slices in lockstep.
        teacher_chunks = project_chunks(_valid_hidden(teacher, ids, mask, valid), *output_head(teacher, vocab), chunk_size)
        for (sl, z_s), (_, z_t) in zip(student_chunks, teacher_chunks):
            _score_chunk(totals, z_s, targets[sl], z_t.to(device), truth(sl), decoding)
    totals.tokens += n_valid


def _perplexity(ce: float) -> float:
    return math.exp(ce) if ce < 700 else float("inf")  # exp overflows a float past ~709.8


def _metrics(totals: _Totals, with_teacher: bool) -> dict[str, float]:
    ece, _ = totals.calibration.result()
    out = {"student_ce": totals.mean("student_ce")}
    out["student_ppl"] = _perplexity(out["student_ce"])
    if with_teacher:
        out["teacher_ce"] = totals.mean("teacher_ce")
        out["teacher_ppl"] = _perplexity(out["teacher_ce"])
        out["kl_teacher_student"] = totals.mean("kl_teacher_student")
        out["top1_agreement"] = totals.mean("top1_agreement")
        out["acceptance_alpha"] = totals.mean("acceptance_alpha")
    for key in ("golden_kl_student", "golden_kl_teacher"):
        if key in totals.sums:
            out[key] = totals.mean(key)
    if totals.bytes_known and "bytes" in totals.sums:  # bits per byte, comparable across tokenizers
        n_bytes = float(totals.sums["bytes"])
        out["bpb"] = bits_per_byte(float(totals.sums["student_ce"]), n_bytes)
        if with_teacher:
            out["teacher_bpb"] = bits_per_byte(float(totals.sums["teacher_ce"]), n_bytes)
        out["bytes"] = int(n_bytes)
    out["ece"] = ece
    out["tokens"] = totals.tokens
    return out


def evaluate(student: nn.Module, batches: Iterable[dict], *, teacher: nn.Module | None = None, vocab: int,
             chunk_size: int = 0, golden=None, acceptance_temperature: float = 1.0,
             acceptance_top_p: float = 1.0) -> EvalResult:
    """Token-mean metrics over every labelled position of ``batches`` (dicts of input_ids, attention_mask,
    labels, each (B, T); HF label convention, -100 = not scored). ``vocab`` is the shared vocabulary size both
    output heads are trimmed to. Metrics are NaN when no position is labelled. With ``golden`` (a
    ``golden.GoldenTable`` of these examples; batches then carry ``example_id``) also golden_kl_student =
    KL(true‖student) and golden_kl_teacher = KL(true‖teacher) over the same positions. acceptance_alpha (with a
    teacher) is measured for sampling at ``acceptance_temperature`` / ``acceptance_top_p`` (0 = greedy decoding:
    the argmax agreement), so a speculative decoder's α can be predicted at its own settings."""
    decoding = SamplingSettings(temperature=acceptance_temperature, top_p=acceptance_top_p)
    decoding.check("acceptance")
    totals = _Totals(calibration=CalibrationBins(ECE_BINS))
    with torch.no_grad(), _eval_mode(student, teacher):
        for batch in batches:
            _score_batch(totals, student, teacher, batch, vocab, chunk_size, golden, decoding)
    _, calibration = totals.calibration.result()
    return EvalResult(_metrics(totals, teacher is not None), calibration)


def evaluate_on_own_tokens(teacher: nn.Module, batches: Iterable[dict], *, vocab: int,
                           chunk_size: int = 0) -> dict[str, float]:
    """A teacher whose tokenizer is not the student's, on its own tokenisation of the same held-out text:
    teacher_ce / teacher_ppl per its own token, and teacher_bpb over the same bytes as the student's bpb (the
    labelled tokens of both tokenisations spell the same text), the comparison that holds across tokenizers."""
    own = evaluate(teacher, batches, vocab=vocab, chunk_size=chunk_size).metrics
    out = {"teacher_ce": own["student_ce"], "teacher_ppl": own["student_ppl"], "teacher_tokens": own["tokens"]}
    if "bpb" in own:
        out |= {"teacher_bpb": own["bpb"], "teacher_bytes": own["bytes"]}
    return out


# ---- samples ---------------------------------------------------------------------------------------------------


@contextmanager
def private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """A fixed seed for the CPU and ``device`` inside; the caller's RNG states restored on exit, so a resumed
    run draws exactly the numbers it would have drawn. Only ``device`` is forked and seeded (not every GPU, as
    a bare ``torch.manual_seed`` would), which keeps other ranks' GPUs untouched under torchrun."""
    accelerator = device.type not in ("cpu", "meta")
    module = torch.get_device_module(device.type) if accelerator else None
    index = (device.index if device.index is not None else module.current_device()) if accelerator else None
    with torch.random.fork_rng(devices=[index] if accelerator else [], device_type=device.type if accelerator else None):
        torch.random.default_generator.manual_seed(seed)
        if accelerator:
            with module.device(index):
                module.manual_seed(seed)  # seeds the current device only
        yield


def generate_sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40, seed: int = 0) -> str:
    """``prompt`` + a sampled continuation (plain softmax sampling: top_k=0, top_p=1, temperature 1).

    Deterministic for a given seed and leaves the global RNG state exactly as it was."""
    device = _device(model)
    input_ids = _prompt_ids(tokenizer, prompt).to(device)  # (1, T_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), _eval_mode(model), private_rng(device, seed):
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=pad_id,
        )
    return prompt + _continuation_text(tokenizer, input_ids[0], out[0])


def _prompt_ids(tokenizer, prompt: str) -> Tensor:
    """(1, T) prompt ids; an empty prompt (or one the tokenizer maps to nothing) starts from BOS, else EOS."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] > 0:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("cannot sample from an empty prompt: the tokenizer has neither a BOS nor an EOS token")
    return torch.tensor([[start]])


def _continuation_text(tokenizer, prompt_ids: Tensor, all_ids: Tensor) -> str:
    """Text the new tokens add. Decoding them alone can drop a leading space (SentencePiece "▁word" at the
    start of a decode), so decode prompt and prompt+continuation and take the difference when it is clean."""
    full = tokenizer.decode(all_ids, skip_special_tokens=True)
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix):]
    return tokenizer.decode(all_ids[prompt_ids.shape[0]:], skip_special_tokens=True)
