"""The one lm_head-fused, chunked loss path.

Student hidden states (N, H) are projected to logits one chunk of positions at a time; each chunk's logits
become a leaf, the registered divergences run on them, and d(loss)/d(logits) is taken right there with
``torch.autograd.grad``. The chunk's contribution to dL/dh (= dz·W) and dL/dW (+= dzᵀ·h) is accumulated during
the forward pass (the Liger-Kernel technique, kept generic), so backward only scales stored gradients by
grad_output. No B·T·V tensor of the student or teacher ever exists: peak extra memory is O(chunk × V).

Temperature, the T² factor, fp32 log-softmax, -inf-safe masking and padded-vocabulary trimming live here and
nowhere else. The result is a *sum* over valid tokens; the loop divides by the global valid-token count.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.labels import IGNORE_INDEX
from potstill.losses.objective import Objective, Term
from potstill.losses.selection import TokenStats, compute_token_stats, concat_stats, selection_weights
from potstill.losses.divergences import label_logprob
from potstill.losses.targets import (SparseChunk, Target, TokenChunk, TokenLogprobs, TopKChunk,
                                     TopKTail, dense_teacher_chunk, is_sparse, logits_divisor, teacher_chunk,
                                     teacher_logprobs)
from potstill.losses import aligned


@dataclass
class LossOutput:
    total: Tensor  # scalar: Σ_terms weight · Σ_tokens token_weight · value (differentiable)
    term_sums: Tensor  # (n_terms,): Σ_tokens token_weight · value per term, before term weights (detached)
    n_valid: int  # tokens with a label in this call (the loop normalises by the global count)
    n_kept: int  # labelled tokens with a non-zero weight (all of them unless the objective selects tokens)
    nll_sums: Tensor | None = None  # (2,): Σ −log q(y), Σ −log p(y) at T = 1 when the objective tracks them
    weight_range: tuple[float, float] = (1.0, 1.0)  # min and max token weight over labelled tokens


# Logits per chunk when chunk_size is 0 ("auto"). CPU: 2^23 (32 MB per fp32 chunk tensor; 256 positions at
# V = 32k) keeps the loss at ~0.15x dense memory and ~0.45x its time. GPU: 2^26 (256 positions at V = 152k),
# because tiny chunks leave an H100 idle (chunk 32 at V = 152k measured 6.6x dense time; benchmarks/RESULTS.md).
# Compiled on a GPU, the per-chunk temporaries fuse away, so larger chunks pay off: 2^28 (1024 positions at
# V = 152k) measured 0.155 s / 3.6 GB vs 0.195 s at 256 positions (H100, bf16, N = 8192, GJSD).
AUTO_CHUNK_LOGITS = {"cpu": 2**23}
AUTO_CHUNK_LOGITS_ACCELERATOR = 2**26
AUTO_CHUNK_LOGITS_COMPILED = 2**28


def resolve_chunk_size(chunk_size: int, vocab: int, device: torch.device | str = "cpu", compiled: bool = False) -> int:
    """``chunk_size`` positions, or for 0 the largest power of two within the device's logits budget."""
    if chunk_size > 0:
        return chunk_size
    kind = torch.device(device).type
    budget = AUTO_CHUNK_LOGITS_COMPILED if compiled and kind != "cpu" else AUTO_CHUNK_LOGITS.get(kind, AUTO_CHUNK_LOGITS_ACCELERATOR)
    return max(16, 1 << max(0, (budget // vocab).bit_length() - 1))


_COMPILED: dict[str, object] = {}


def compiled_term_sums():
    """``chunk_term_sums`` under torch.compile (built once): fuses the per-chunk elementwise passes on GPUs.
    Shapes are left to automatic dynamism: the number of positions differs from batch to batch (and in the last
    chunk), so after the first change that dimension is compiled symbolically instead of once per size."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(chunk_term_sums)
    return _COMPILED["fn"]


COMPILE_MIN_VOCAB = 16384  # below this the compile time (~10 s) outweighs what fusion saves per step


def should_compile(setting: str, objective: Objective, device: torch.device | str, vocab: int) -> bool:
    """loss.compile: 'auto' = on accelerators, for vocabularies ≥ COMPILE_MIN_VOCAB and objectives without
    schedules (a schedule's changing python float would be baked into the compiled graph and force a recompile
    every step); 'true'/'false' force it. Measured on an H100: quickstart (V = 479) 25 s compiled vs 10 s eager.
    On CPU, auto stays off: compiled, gjsd's per-chunk elementwise work ran ~2x faster (V = 32k), but the compile
    took 16-47 s on the shared 2-core machine, repaid only after tens of N = 4096 steps (benchmarks/RESULTS.md)."""
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"loss.compile={setting!r}: use auto, true or false")
    if setting != "auto":
        return setting == "true"
    has_schedule = objective.temperature_schedule is not None or any(t.schedule is not None for t in objective.terms)
    has_schedule = has_schedule or bool(objective.crosstok_terms)  # their chunk objects are not compile-friendly
    return torch.device(device).type != "cpu" and vocab >= COMPILE_MIN_VOCAB and not has_schedule


def chunk_slices(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def project_chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int) -> Iterator[tuple[slice, Tensor]]:
    """(slice, fp32 logits of that chunk) for positions of ``hidden`` (N, H): the no-grad path evaluation uses."""
    for sl in chunk_slices(hidden.shape[0], resolve_chunk_size(chunk_size, weight.shape[0], weight.device)):
        yield sl, F.linear(hidden[sl], weight, bias).float()


@torch.no_grad()
def token_statistics(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, target: Target,
                     chunk_size: int, reference: Target | None = None, sequence: Tensor | None = None) -> TokenStats:
    """Per-token statistics (N,) of student, teacher (and reference model) at T = 1, chunk by chunk; ``sequence``
    (N,) numbers the batch row of each position (for selectors that sum along sequences)."""
    vocab = weight.shape[0]
    if is_sparse(target) or isinstance(target, TokenLogprobs) or logits_divisor(target, 1.0) != 1.0:
        raise ValueError("token selection and temperature schedules need the teacher's full distribution at T = 1")
    logits = lambda t, sl: None if t is None else dense_teacher_chunk(t, sl, vocab).float()  # noqa: E731
    parts = [compute_token_stats(z, logits(target, sl), labels[sl], logits(reference, sl))
             for sl, z in project_chunks(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), chunk_size)]
    stats = concat_stats(parts)
    stats.sequence = sequence
    return stats


@torch.no_grad()
def student_label_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                           chunk_size: int) -> Tensor:
    """log q(y) (N,) at T = 1 of every position's label (ignored rows read id 0), chunk by chunk."""
    return torch.cat([label_logprob(F.log_softmax(z, -1), labels[sl]) for sl, z in
                      project_chunks(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), chunk_size)])


def label_logp(labels: Tensor, vocab: int) -> Tensor:
    """One-hot log-probs (n, V) for the data labels: 0 at the label, -inf elsewhere (ignored rows use id 0)."""
    out = torch.full((labels.shape[0], vocab), float("-inf"), device=labels.device)
    return out.scatter_(-1, labels.clamp_min(0)[:, None], 0.0)


def label_term(term: Term, logq: Tensor, labels: Tensor) -> Tensor:
    """A label term's per-token value: through its sparse form with the label as a one-sample target of weight 1
    (the same value as against the one-hot distribution, without an (n, V) tensor), else the one-hot form."""
    if term.sparse is None:
        return term(logq, label_logp(labels, logq.shape[-1]))
    ids = labels.clamp_min(0)[:, None]  # ignored rows read id 0; the caller masks them
    return term.sparse(logq, ids, torch.ones(ids.shape, dtype=logq.dtype, device=logq.device))


def chunk_term_sums(z: Tensor, labels: Tensor, weights: Tensor,
                    teacher: Tensor | SparseChunk | TopKChunk | TokenChunk | None, objective: Objective,
                    divisor: float = 1.0, sampler_logp: Tensor | None = None) -> Tensor:
    """Per-term weighted sums over one chunk. z: student logits (n, V) fp32; labels (n,); weights (n,);
    teacher: (n, V) logits (divided by ``divisor``: the temperature, or 1 for pre-tempered log-probs), sparse
    samples, top-k, or label-token log-probs: terms with a sparse form (fkl) take the top-k ids plus the data label
    as their sample (``TopKChunk.with_label``), every other term sees student and teacher collapsed to k + 1 bins.
    Sampled-token terms (opd) read the label token's log-probs only (the dense teacher's gathered at the label);
    ``sampler_logp`` (n,) is the sampling policy's log-prob of each label, for their importance weight."""
    valid = weights != 0
    logp_t = logq_bins = None
    tau = objective.tau
    logq_1 = F.log_softmax(z, -1) if any(t.uses_labels for t in objective.terms) or tau == 1.0 else None
    logq_t = logq_1 if tau == 1.0 else None  # at T = 1 label and teacher terms share one log-softmax
    sums = []
    for index, term in enumerate(objective.terms):
        if term.uses_labels:  # label terms always at T = 1: they are the data likelihood
            per_token = label_term(term, logq_1, labels)
        elif term.crosstok is not None:  # uld, gold, alm (losses/aligned.py); alm is at T = 1 without T²
            logq_t = F.log_softmax(z / tau, -1) if logq_t is None else logq_t
            logq_1 = F.log_softmax(z, -1) if logq_1 is None else logq_1
            scale = 1.0 if term.crosstok == "chunk" else objective.teacher_scale
            per_token = aligned.term_values(term, index, logq_t, logq_1, teacher, labels, divisor, tau) * scale
        else:
            logq_t = F.log_softmax(z / tau, -1) if logq_t is None else logq_t
            if term.token is not None:  # opd: the label is the sampled token
                if isinstance(teacher, TokenChunk):
                    teacher_y = teacher.teacher_logp
                else:
                    logp_t = teacher_logprobs(teacher, divisor) if logp_t is None else logp_t
                    teacher_y = label_logprob(logp_t, labels)
                per_token = term.token(label_logprob(logq_t, labels), teacher_y, sampler_logp) * objective.teacher_scale
            elif isinstance(teacher, SparseChunk):
                per_token = term.sparse(logq_t, teacher.ids, teacher.weights) * objective.teacher_scale
            elif isinstance(teacher, TopKChunk) and term.sparse is not None:  # fkl: top-k + the label for the tail
                per_token = term.sparse(logq_t, *teacher.with_label(labels)) * objective.teacher_scale
            elif isinstance(teacher, TopKChunk):
                logq_bins = teacher.student(logq_t) if logq_bins is None else logq_bins
                per_token = term(logq_bins, teacher.teacher_logp) * objective.teacher_scale
            else:
                logp_t = teacher_logprobs(teacher, divisor) if logp_t is None else logp_t
                per_token = term(logq_t, logp_t) * objective.teacher_scale
        sums.append((torch.where(valid, per_token, torch.zeros_like(per_token)) * weights).sum())
    return torch.stack(sums)


@torch.no_grad()
def label_nll_sums(z: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """(2,): Σ −log q(y) and Σ −log p(y) at T = 1 over the chunk's labelled positions."""
    valid = labels != IGNORE_INDEX
    nll = lambda logits: -(label_logprob(F.log_softmax(logits.float(), -1), labels) * valid).sum()  # noqa: E731
    return torch.stack([nll(z), nll(teacher_logits)])


def _term_weights(objective: Objective, device: torch.device) -> Tensor:
    return torch.tensor([t.weight for t in objective.terms], device=device)


def labelled_chunks(weights: Tensor, chunk_size: int) -> list[bool]:
    """Per chunk of ``weights`` (N,): does it hold a position with a non-zero weight? One host sync per call (the
    loop skips padding-only chunks), instead of one per chunk, which would stall a GPU's queue every chunk."""
    padded = F.pad(weights, (0, -weights.shape[0] % chunk_size))
    return padded.view(-1, chunk_size).ne(0).any(1).tolist()


def matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the chunk matmuls run in: the ambient autocast dtype where autocast is on (fp32 master weights,
    half-precision activations), else the inputs' common dtype. Made explicit because the loop runs with autocast
    off: the log-softmax and divergences must stay fp32 whatever the caller's context."""
    kind = hidden.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


_HALF_GEMM_FP32_OUT: dict[tuple[str, torch.dtype], bool] = {}


def half_gemm_with_fp32_out(h_c: Tensor) -> bool:
    """Whether this CUDA build runs ``torch.mm(..., out_dtype=float32)`` on half-precision inputs (checked once per
    device type and dtype with a tiny GEMM; builds without the kernel fall back to fp32 operands)."""
    key = (h_c.device.type, h_c.dtype)
    if key not in _HALF_GEMM_FP32_OUT:
        probe = torch.ones(2, 2, device=h_c.device, dtype=h_c.dtype)
        try:
            _HALF_GEMM_FP32_OUT[key] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, NotImplementedError, TypeError):
            _HALF_GEMM_FP32_OUT[key] = False
    return _HALF_GEMM_FP32_OUT[key]


def add_weight_grad(grad_w: Tensor, dz: Tensor, h_c: Tensor) -> None:
    """grad_w (V, H) fp32 += dzᵀ·h_c. Half-precision inputs on CUDA: a half-precision GEMM with an fp32 result
    (``out_dtype``), so the accumulation stays fp32 without an fp32 GEMM; elsewhere fp32 operands."""
    if h_c.dtype in (torch.bfloat16, torch.float16) and h_c.device.type == "cuda" and half_gemm_with_fp32_out(h_c):
        grad_w.add_(torch.mm(dz.to(h_c.dtype).t(), h_c, out_dtype=torch.float32))
    else:
        grad_w.addmm_(dz.t(), h_c.float())


def autocast_off(device: torch.device):
    """Autocast disabled on ``device`` (matmul dtypes are explicit in the loop, softmax and divergences fp32)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def _run_chunks(hidden, weight, bias, labels, token_weight, target, objective, chunk_size, want_grads, compiled=False,
                sampler_logp=None):
    """The shared chunk loop. Returns (sums, grad_hidden, grad_weight, grad_bias); sums (n_terms + 2,) holds the
    per-term sums, then the student's and teacher's label NLL sums (zeros unless the objective tracks them)."""
    dtype = matmul_dtype(hidden, weight)  # read before autocast is switched off
    with autocast_off(hidden.device):
        return _chunk_loop(hidden, weight, bias, labels, token_weight, target, objective, chunk_size, want_grads,
                           compiled, dtype, sampler_logp)


def _chunk_loop(hidden, weight, bias, labels, token_weight, target, objective, chunk_size, want_grads, compiled, dtype,
                sampler_logp=None):
    """``_run_chunks`` with autocast off: matmuls in ``dtype``, logits and everything after them in fp32, the
    weight (and bias) gradient accumulated in fp32."""
    n, vocab = hidden.shape[0], weight.shape[0]
    weights = (labels != IGNORE_INDEX).float() * (1.0 if token_weight is None else token_weight.float())
    term_sums_fn = compiled_term_sums() if compiled else chunk_term_sums
    divisor = logits_divisor(target, objective.tau) if objective.needs_teacher else 1.0
    term_weights = _term_weights(objective, hidden.device)
    term_sums = torch.zeros(len(objective.terms), device=hidden.device)
    nll_sums = torch.zeros(2, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if want_grads and hidden.requires_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads and weight.requires_grad else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want_grads and bias is not None and bias.requires_grad else None
    h, w = hidden.detach().to(dtype), weight.detach().to(dtype)  # one cast per call, not per chunk
    b = None if bias is None else bias.detach().to(dtype)
    for sl, labelled in zip(chunk_slices(n, chunk_size), labelled_chunks(weights, chunk_size)):
        if not labelled:
            continue  # padding-only chunk: contributes nothing, costs nothing
        h_c = h[sl]
        t_c = teacher_chunk(target, sl, vocab) if objective.needs_teacher else None
        with torch.enable_grad():
            z = F.linear(h_c, w, b).float().requires_grad_(want_grads)
            sums_c = term_sums_fn(z, labels[sl], weights[sl], t_c, objective, divisor,
                                  None if sampler_logp is None else sampler_logp[sl])
            if want_grads:
                (dz,) = torch.autograd.grad((sums_c * term_weights).sum(), z)
        term_sums += sums_c.detach()
        if objective.tracks_nll:
            t_dense = dense_teacher_chunk(target, sl, vocab) if isinstance(target, TopKTail) else t_c
            nll_sums += label_nll_sums(z.detach(), t_dense, labels[sl])
        if grad_h is not None:
            grad_h[sl] = dz.to(dtype) @ w
        if grad_w is not None:
            add_weight_grad(grad_w, dz, h_c)
        if grad_b is not None:
            grad_b += dz.sum(0)
    return torch.cat([term_sums, nll_sums]), grad_h, grad_w, grad_b


class _FusedLoss(torch.autograd.Function):
    """Gradients are computed in forward (see module docstring); backward only scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weight, target, objective, chunk_size, compiled, sampler_logp):
        sums, gh, gw, gb = _run_chunks(hidden, weight, bias, labels, token_weight, target, objective, chunk_size, True,
                                       compiled, sampler_logp)
        ctx.save_for_backward(gh, gw, gb)
        ctx.param_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(sums)
        n_terms = len(objective.terms)
        return (sums[:n_terms] * _term_weights(objective, sums.device)).sum(), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_term_sums):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.param_dtypes)]
        return (*grads, None, None, None, None, None, None, None)


def check_target_support(objective: Objective, target: Target | None) -> None:
    """Refuse, with one line naming what is missing, terms the teacher signal cannot serve."""
    aligned.check_support(objective, target)
    if is_sparse(target):
        objective.check_sparse_support("a sampled teacher target")
    elif isinstance(target, TopKTail):
        objective.check_label_logprobs("a top-k teacher target")
    elif isinstance(target, TokenLogprobs):
        objective.check_token_support("a label-token teacher target")
        if objective.tracks_nll:
            raise ValueError("temperature schedules need the teacher's full distribution at T = 1, not label-token "
                             "log-probs")


def fused_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    objective: Objective,
    target: Target | None = None,
    *,
    chunk_size: int = 0,
    token_weight: Tensor | None = None,
    reference: Target | None = None,
    compiled: bool = False,
    sampler_logp: Tensor | None = None,
) -> LossOutput:
    """Sum of the objective over labelled positions. hidden (..., H) and labels (...) are flattened together;
    ``weight`` (V, H) is the student's output head already trimmed to the shared vocabulary size V.
    ``reference`` is a reference model's signal, used only by token selectors that need one (AdaSPEC).
    ``compiled`` runs the per-chunk objective under torch.compile (see ``should_compile``).
    ``sampler_logp`` (...) like labels: the log-prob the sampling policy gave each label token (rollouts), for the
    importance weight of sampled-token terms (opd); None = the labels were sampled from the student itself."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    sequence = rows.repeat_interleave(hidden.shape[1]) if hidden.dim() == 3 else None  # (B, T, H): row = sequence
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} positions but labels {labels.shape[0]}")
    if objective.needs_teacher and target is None:
        raise ValueError(f"objective '{objective}' needs a teacher signal but none was given")
    check_target_support(objective, target)
    if sampler_logp is not None:  # unlabelled positions may hold anything; the importance weight must stay finite
        sampler_logp = torch.where(labels != IGNORE_INDEX, sampler_logp.reshape(-1).float(), 0.0)
    tw = None if token_weight is None else token_weight.reshape(-1)
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], weight.device, compiled)
    n_valid = int((labels != IGNORE_INDEX).sum())
    if objective.selection is not None:
        stats = token_statistics(hidden, weight, bias, labels, target, chunk_size, reference, sequence)
        selected = selection_weights(stats, objective.selection.name, objective.selection.hparams)
        tw = selected if tw is None else tw * selected
    if aligned.needs_prepass(objective, target):  # alm couples the positions of a chunk: its no-grad pre-pass
        target = aligned.prepare_chunk_terms(target, objective.terms,
                                             student_label_logprobs(hidden, weight, bias, labels, chunk_size), labels)
    n_kept = n_valid if tw is None else int(((tw != 0) & (labels != IGNORE_INDEX)).sum())
    labelled_weights = None if tw is None else tw[labels != IGNORE_INDEX]
    weight_range = (1.0, 1.0) if labelled_weights is None or not n_valid else (labelled_weights.min().item(), labelled_weights.max().item())
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    n_terms = len(objective.terms)
    if needs_grad:
        total, sums = _FusedLoss.apply(hidden, weight, bias, labels, tw, target, objective, chunk_size, compiled,
                                       sampler_logp)
    else:
        sums = _run_chunks(hidden, weight, bias, labels, tw, target, objective, chunk_size, False, compiled,
                           sampler_logp)[0]
        total = (sums[:n_terms] * _term_weights(objective, sums.device)).sum()
    return LossOutput(total, sums[:n_terms], n_valid, n_kept, sums[n_terms:] if objective.tracks_nll else None, weight_range)
