"""Mixed precision and gradient checkpointing: the one place that resolves `auto` dtypes, builds the autocast
context and wraps the fp16 grad scaler (docs/precision.md).

The student's weights (the master weights) and AdamW's states stay in ``student.dtype`` (float32 by default); with
``train.precision`` bf16 or fp16 only the student's forward (decoder body) and the fused loss run under
``torch.autocast``, so matmuls run in half precision while every parameter, its gradient and the optimizer state
keep full precision. Frozen models (teacher, loss.reference) run in their own dtype without autocast.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Student weight dtypes each autocast precision accepts. fp16 needs fp32 master weights: GradScaler refuses to
# unscale fp16 gradients, and bf16 weights under fp16 autocast would round every weight twice. bf16 autocast over
# bf16 weights is the pure-bf16 mode (no master weights) potstill had before; it stays allowed.
STUDENT_DTYPES = {"fp32": ("float32", "bfloat16", "float16"), "bf16": ("float32", "bfloat16"), "fp16": ("float32",)}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA compute capability ≥ 8, or ROCm); False on the CPU, where
    bf16 autocast runs but is not what `auto` should pick (no speed-up on most CPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(setting: str, device: torch.device, bf16_ok: bool | None = None) -> str:
    """train.precision → fp32, bf16 or fp16: `auto` is bf16 on a CUDA device with native bf16, else fp32.
    ``bf16_ok`` overrides the device query (tests resolve for a CUDA device without one)."""
    if setting != "auto":
        return setting
    bf16_ok = native_bf16(device) if bf16_ok is None else bf16_ok
    return "bf16" if device.type == "cuda" and bf16_ok else "fp32"


def resolve_model_dtype(name: str, device: torch.device, bf16_ok: bool | None = None) -> str:
    """A frozen model's dtype name (teacher.dtype): `auto` is bfloat16 on a CUDA device with native bf16, else
    float32; any other name is returned as is (models.torch_dtype checks it)."""
    if name != "auto":
        return name
    return "bfloat16" if resolve_precision("auto", device, bf16_ok) == "bf16" else "float32"


def check_settings(precision: str, student_dtype: str, teacher_dtype: str) -> None:
    """Config-time checks (one line each); ``precision`` may still be `auto` (checked again once resolved)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: use {', '.join(PRECISIONS)}")
    if teacher_dtype not in MODEL_DTYPES:
        raise ValueError(f"teacher.dtype={teacher_dtype!r}: use {', '.join(MODEL_DTYPES)}")
    if student_dtype not in MODEL_DTYPES[1:]:
        raise ValueError(f"student.dtype={student_dtype!r}: use {', '.join(MODEL_DTYPES[1:])}")
    if precision != "auto":
        check_student_dtype(precision, student_dtype)


def check_student_dtype(precision: str, student_dtype: str, resolved_from: str = "") -> None:
    if student_dtype not in STUDENT_DTYPES[precision]:
        how = f" (train.precision=auto resolved to {precision} on this device)" if resolved_from == "auto" else ""
        raise ValueError(f"train.precision={precision} with student.dtype={student_dtype}{how}: {precision} autocast "
                         f"needs master weights in {' or '.join(STUDENT_DTYPES[precision])}; set student.dtype=float32")


def check_device(precision: str, device: torch.device) -> None:
    """Refuse half-precision autocast a device cannot run (fp16 and bf16 autocast both run on the CPU in torch 2.13)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision=bf16: {device} has no bfloat16 support; use train.precision=fp16 or fp32")


@dataclass(frozen=True)
class Amp:
    """The resolved precision of a run: the autocast context, and for fp16 the grad scaler.

    fp16: the loss is scaled before backward, gradients are unscaled before clipping, and ``step`` lets the scaler
    skip AdamW (and lower its scale) when a gradient is inf/NaN: that is the scaler's routine, not a broken step, so
    the loop's non-finite guard checks the loss and terms but not the gradient norm (``guarded_grad_norm``)."""

    precision: str  # fp32, bf16 or fp16
    device_type: str
    teacher_dtype: str = "float32"  # teacher.dtype resolved (recorded in checkpoints)
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, precision: str, device: torch.device, teacher_dtype: str = "float32") -> "Amp":
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        return cls(precision, device.type, teacher_dtype, scaler)

    def autocast(self) -> AbstractContextManager:
        dtype = AUTOCAST_DTYPES[self.precision]
        return nullcontext() if dtype is None else torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the gradients in true units (and the scaler's inf/NaN check for this step)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def guarded_grad_norm(self, grad_norm: float) -> float:
        """The gradient norm the non-finite guard checks: under fp16 an inf/NaN gradient is the scaler's business."""
        return grad_norm if self.scaler is None else 0.0

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """AdamW's step; False when the fp16 scaler skipped it (an inf/NaN gradient: the scale was lowered)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale only drops when the step was skipped

    def abandon(self) -> None:
        """A step the loop's guard dropped (non-finite loss): close the scaler's step so the next one can unscale."""
        if self.scaler is not None:
            self.scaler.update()

    def stats(self) -> dict[str, float]:
        return {} if self.scaler is None else {"grad_scale": self.scaler.get_scale()}

    def state_dict(self) -> dict:
        """What exact resume needs: the resolved precision and the scaler's scale and growth tracker."""
        return {"precision": self.precision, "teacher_dtype": self.teacher_dtype,
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if state and state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


def setup(cfg, device: torch.device, student: torch.nn.Module, resume_from: Path | None = None) -> Amp:
    """The run's Amp, after the checks that need the device and the loaded student; turns on gradient
    checkpointing when configured. ``resume_from``: a checkpoint whose resolved settings must be the same."""
    precision = resolve_precision(cfg.train.precision, device)
    check_student_dtype(precision, cfg.student.dtype, cfg.train.precision)
    check_device(precision, device)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    amp = Amp.create(precision, device, resolve_model_dtype(cfg.teacher.dtype, device))
    if resume_from is not None:
        check_resume(resume_from, amp, cfg)
    return amp


# Keys rundir lets a resumed run rewrite because check_resume compares what they resolve to on the device.
RESOLVED_ON_RESUME = ("train.precision", "teacher.dtype")


def check_resume(checkpoint_dir: Path, amp: Amp, cfg) -> None:
    """`auto` resolves by device and a resumed run may move to another device, so the config keys may change but
    their resolved values must stay the checkpoint's: they change the trajectory. Reads the trainer state
    memory-mapped, so the optimizer state is not loaded twice."""
    state = torch.load(checkpoint_dir / "potstill" / "trainer_state.pt", weights_only=False, mmap=True)
    saved = state.get("amp") or {}  # checkpoints from before train.precision trained in fp32 with the given teacher dtype
    pairs = [("train.precision", cfg.train.precision, saved.get("precision", "fp32"), amp.precision),
             ("teacher.dtype", cfg.teacher.dtype, saved.get("teacher_dtype", amp.teacher_dtype), amp.teacher_dtype)]
    for key, setting, old, new in pairs:
        if old != new:
            raise ValueError(f"--resume: {checkpoint_dir} was trained with {key}={old}, but {key}={setting} gives "
                             f"{new} on this device; pass {key}={old} to follow the same trajectory")


def enable_gradient_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder layer (non-reentrant: works with frozen inputs and keeps the
    RNG stream, so dropout and exact resume are unaffected). Applies while the model is in train() mode, also when
    the loop calls the decoder body directly (models.hidden_states)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing; set train.gradient_checkpointing=false")
    # transformers 5 name of gradient_checkpointing_enable (now a deprecated alias of this)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


FULL = Amp("fp32", "cpu")  # no autocast, no scaler: the default for callers that do not set up a precision
