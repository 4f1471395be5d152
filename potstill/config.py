"""Run configuration: dataclasses whose field docstrings are the ``--help`` text.

A run is described by a YAML file (optional) plus ``section.key=value`` overrides, read into these dataclasses by
``config_parsing`` (unknown keys fail with a "did you mean", values are coerced with an error naming the key); the
objective is parsed and its hyperparameters range-checked here, at load time, never mid-run.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from potstill.config_parsing import apply_override, build, field_docs, parse_yaml
from potstill.losses.objective import Objective, parse_objective
from potstill.precision import check_settings as check_precision_settings
from potstill.hidden.settings import HiddenConfig
from potstill.multiteacher.settings import TeachersConfig
from potstill.onpolicy.settings import OnPolicyConfig
from potstill.encoders.settings import TaskConfig


@dataclass
class TeacherConfig:
    path: str | None = None
    """Teacher model: a local Hugging Face directory or a hub id; `builtin` is the shipped default teacher."""
    dtype: str = "auto"
    """Teacher (and loss.reference) weights dtype: auto (bfloat16 on a CUDA GPU with native bf16, else float32), float32, bfloat16 or float16; it runs in this dtype without gradients or autocast."""
    cache: str | None = None
    """Teacher-signal cache directory: `potstill cache` writes it; `distill` then takes every teacher signal from it. With teacher.path set too, the cache still supplies the signal; the teacher is loaded (on the CPU) only to copy its layers for student.init_from_teacher_layers."""
    self_distill: str = "none"
    """Self-distillation (no teacher.path): `frozen` (a copy of the initial student), `ema` (an exponential moving average of the student, updated after every optimiser step) or `live` (the student itself, no-grad, in eval mode) is the teacher; it reads a record's `privileged_context` before the prompt (docs/onpolicy.md). `none` = teacher.path / teacher.cache."""
    ema_decay: float = 0.99
    """teacher.self_distill=ema: teacher ← decay·teacher + (1 − decay)·student after every optimiser step (0 ≤ decay < 1)."""
    server_url: str | None = None
    """A teacher behind an OpenAI-compatible completions endpoint that scores given tokens (vLLM, `potstill serve`), e.g. http://127.0.0.1:8000: every teacher signal comes from it (docs/server-teacher.md). teacher.path, if set, supplies only the tokenizer (and the layers for student.init_from_teacher_layers)."""
    server_model: str | None = None
    """The model name the teacher server serves (the request's `model`)."""
    server_top_k: int = 0
    """0: the server returns the teacher's log-prob of each label token only (serves opd and ce); k > 0: its k most likely ids per position, a top-k target (serves every term but opd)."""
    server_timeout: float = 60.0
    """Seconds per server request; failed requests are retried 3 times with exponential backoff."""
    api_key_env: str | None = None
    """Name of the environment variable holding the server's API key (the key itself is never written anywhere); unset = no key."""


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank (through peft); 0 = train every weight of the student. With r > 0 the student's weights stay frozen and only the adapters (and student.lora.modules_to_save) train."""
    alpha: float | None = None
    """LoRA scaling numerator: the update is (alpha / r)·B·A (alpha / √r with rslora); None = r (scaling 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs (0 ≤ p < 1)."""
    target_modules: str | list | None = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer except the output head), or a list of module names such as [q_proj, v_proj] (lm_head allowed when the head is not tied to the embeddings)."""
    modules_to_save: list | None = None
    """Modules trained in full next to the adapters, e.g. [lm_head] (not with tied embeddings)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/√r instead of alpha/r."""
    save_adapter: bool = False
    """final/ always holds the merged student (a plain HF model); true also writes the adapters to final/adapter/ (peft's format)."""


@dataclass
class StudentConfig:
    path: str | None = None
    """Start the student from this local HF directory or hub id (mutually exclusive with `config`)."""
    config: dict | str | None = None
    """Build a fresh student from a model config: a dict with `model_type` (llama, qwen2, gpt2, ...) or a config.json path."""
    init_from_teacher_layers: int | None = None
    """Initialise the student as the teacher's embeddings, first N blocks, final norm and head (teacher-truncation init)."""
    tokenizer: str | None = None
    """A fresh student's (`student.config`) own tokenizer: a local dir or hub id. When it differs from the teacher's, the objective needs a cross-tokenizer term (`uld`, `gold`, `alm`; docs/cross-tokenizer.md)."""
    dtype: str = "float32"
    """Student weights dtype = master weights and AdamW state dtype (float32; bfloat16 = pure bf16 training, no master weights)."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = "builtin"
    """Training data: a .jsonl file (`text`, `prompt`/`completion` or chat `messages`), a .parquet file, a saved HF datasets dir, or a built-in source: `builtin` (grammar texts), `builtin:arithmetic`, `builtin:arithmetic-multitask`, `builtin:mixed` (docs/monitoring.md)."""
    validation: str | None = None
    """Held-out data in the same formats; default: a built-in source's own validation split for built-in training data, else 2% of the training file."""
    max_length: int = 1024
    """Examples are truncated to this many tokens."""
    packing: bool = False
    """Pack each training batch's examples into shared rows of at most `max_length` tokens (no attention across documents, position ids restart per document): same loss, less padding computed. Evaluation batches stay padded."""
    max_train_examples: int | None = None
    """Use at most this many training examples (None = all)."""
    max_eval_examples: int = 256
    """Evaluate on at most this many held-out examples."""
    regime: str = "offline"
    """Where the trained completions come from: `offline` (the data's own) or `onpolicy` (sampled from the student with probability onpolicy.lam per step, scored by the teacher; docs/onpolicy.md)."""


@dataclass
class LossConfig:
    objective: str = "fkl"
    """Weighted sum of registered terms, e.g. `fkl`, `0.5*ce + 0.5*gjsd(beta=0.5)` (see `potstill losses`)."""
    temperature: float = 1.0
    """Softmax temperature for teacher-target terms (label CE always uses T = 1)."""
    temperature_schedule: str = "fixed"
    """`fixed`, or `dts(t_min=2, t_max=4, momentum=0.9)`: Dynamic Temperature Scheduler starting at loss.temperature."""
    t_squared: bool = True
    """Multiply teacher-target terms by T² so their gradient scale does not shrink as T grows (Hinton et al.)."""
    select: str | None = None
    """Token selection/weighting for every term, e.g. `entropy(keep=0.2)`, `tip`, `tsd`, `reference(keep=0.4)` (docs/objectives.md)."""
    reference: str | None = None
    """Reference model (HF dir or hub id; same tokenizer) for the `reference` selector (AdaSPEC: the draft after plain KD)."""
    chunk_size: int = 0
    """Positions projected to logits at once; peak loss memory is O(chunk_size × vocab). 0 = auto (sized per device)."""
    compile: str = "auto"
    """torch.compile the per-chunk objective: auto (GPUs, vocab ≥ 16384, objectives without schedules), true or false."""


@dataclass
class CacheConfig:
    mode: str = "sample"
    """What `potstill cache` stores per position: dense (full log-probs), topk (k ids + log-probs + tail mass; serves every objective) or sample (RS-KD draws; fkl and ce only, the best student per byte: benchmarks/RESULTS.md)."""
    k: int = 8
    """topk: ids kept per position."""
    samples: int = 64
    """sample: draws per position (≤ 255)."""
    proposal_temperature: float | None = None
    """sample: draw from the teacher at this temperature (importance-weighted); None = loss.temperature."""
    seed: int = 0
    """sample: seed of the draws (per example, independent of batching and sharding)."""
    shard_size: int = 512
    """Examples per shard file (the unit of resume)."""
    batch_size: int = 8
    """Examples per teacher forward pass while building."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimiser steps."""
    batch_size: int = 8
    """Examples per micro-batch on each rank: one optimiser step sees batch_size × grad_accum × ranks examples (docs/distributed.md)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (the loss is normalised by the step's total token count, so this is exact)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW); the default suits a pretrained student (a tiny fresh one wants ~3e-3)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int | None = None
    """Linear warm-up steps; None = 5% of max_steps (rounded up)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear or constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    log_every: int = 10
    """Write a train line to metrics.jsonl every N steps."""
    eval_every: int = 100
    """Evaluate every N steps (and always at the end); 0 = only at the end."""
    save_every: int = 100
    """Checkpoint every N steps (and always at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest N step checkpoints (the final student is always kept)."""
    on_nonfinite: str = "stop"
    """A step whose loss, any term or gradient norm is NaN/inf never updates the model: `stop` ends the run (the last checkpoint stays), `skip` drops the step (at most 10 in a row)."""
    precision: str = "auto"
    """Mixed precision of the student's forward and the loss: auto (bf16 on a CUDA GPU with native bf16, else fp32), fp32, bf16 or fp16 (with a grad scaler); weights and AdamW state stay in student.dtype (docs/precision.md)."""
    gradient_checkpointing: bool = False
    """Recompute the student's decoder layers in backward instead of storing their activations (less memory, ~1/3 more compute)."""
    report_to: str | list = "tensorboard"
    """Trackers that get every metrics.jsonl value: tensorboard (RUN/tensorboard/, no account or network), wandb, mlflow (extras: pip install 'potstill[wandb]'), none, or a list."""

    def resolved_warmup(self) -> int:
        """Warm-up steps in effect: the explicit value, else 5% of max_steps rounded up."""
        return self.warmup_steps if self.warmup_steps is not None else math.ceil(0.05 * self.max_steps)


@dataclass
class ParallelConfig:
    strategy: str = "auto"
    """Data parallelism under torchrun / accelerate launch (WORLD_SIZE > 1): auto (= ddp), ddp, or fsdp (FSDP2: student sharded per decoder block). No effect in a single process (docs/distributed.md)."""
    teacher: str = "replicate"
    """The frozen teacher (and loss.reference) on several ranks: replicate (a full copy per rank) or shard (FSDP2 per decoder block; needs teacher.path, not teacher.cache)."""


@dataclass
class EvalConfig:
    batch_size: int = 16
    """Examples per evaluation batch."""
    sample_prompt: str = ""
    """Prompt for the generated sample shown in metrics and the report ('' = BOS only)."""
    max_new_tokens: int = 40
    """Length of the generated sample."""
    max_task_examples: int = 64
    """Held-out prompts per task with a checkable answer (builtin:arithmetic data) generated greedily at each evaluation for task_accuracy, gen_length and eos_rate; 0 = off (docs/monitoring.md)."""
    task_max_new_tokens: int = 0
    """New tokens per task generation; 0 = auto (per task: its longest held-out completion + 8)."""
    early_stop: str = "none"
    """`none`, or `golden`: stop the run when golden_kl_student = KL(true‖student) has not improved for eval.patience evaluations (built-in held-out data only; final/ = the model at the stopping step)."""
    patience: int = 3
    """Evaluations without a new best golden_kl_student before eval.early_stop=golden stops the run."""


@dataclass
class GenerateConfig:
    backend: str = "local"
    """`potstill generate`'s teacher: local (teacher.path through potstill's batched KV-cached sampler), openai (any OpenAI-compatible server: generate.base_url + generate.model, e.g. `potstill serve` or vLLM's), or vllm (teacher.path in vLLM, when installed)."""
    out: str = "generated.jsonl"
    """Output JSONL, appended and flushed as completions arrive; a rerun with the same settings resumes it (OUT.meta.json holds the settings, OUT.rejected.jsonl the filtered completions' ids)."""
    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p."""
    max_new_tokens: int = 256
    """Longest completion, in tokens."""
    seed: int = 0
    """Seed of the draws: local, per batch of prompts (from the seed and the batch's first prompt id); openai, one seed per request (from the seed, prompt id and sample)."""
    batch_size: int = 16
    """local: prompts per sampling batch (n rows each); it fixes the draws, so a resume must keep it."""
    endpoint: str = "chat"
    """openai: chat (/v1/chat/completions; a prompt record becomes one user message) or completions (/v1/completions with the prompt text as is; prompt records only)."""
    base_url: str | None = None
    """openai: the API base URL, e.g. http://127.0.0.1:8000/v1 (None = the client's default, OPENAI_BASE_URL or api.openai.com)."""
    model: str | None = None
    """openai: the model name to request (as the server's /v1/models lists it)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: NAME of the environment variable holding the API key. The key itself is never a config value and is never written to the output, logs or error messages."""
    concurrency: int = 8
    """openai: requests in flight at once."""
    timeout: float = 60.0
    """openai: seconds before a request is abandoned (and retried)."""
    max_retries: int = 3
    """openai: retries per request on 408/409/429/5xx, timeouts and connection errors, with exponential backoff; a request still failing is counted and logged, and the next run retries it."""
    checker: str = "none"
    """Keep only verified completions: none, or arithmetic (the answer `builtin.arithmetic.extract_answer` finds must equal the record's `answer`)."""
    dedup: bool = False
    """Drop a completion identical to one already kept for the same prompt."""
    min_tokens: int = 0
    """Drop completions shorter than this many generated tokens (EOS included)."""
    max_tokens: int | None = None
    """Drop completions longer than this many generated tokens (EOS included); None = no bound."""
    keep_unfinished: bool = False
    """Keep completions cut at max_new_tokens (training appends EOS to them, teaching the student to stop there); default: drop them."""


def _check_teacher_signal_kinds(obj: Objective, several_teachers: bool, hidden_kd: bool, task_kind: str) -> None:
    """Cross-tokenizer terms, several teachers, hidden-state KD and classifier/encoder KD each build the teacher
    signal their own way (an aligned target, a mixture, the live teacher's states, a pooled seam); two of them in one
    run are refused in one line."""
    used = [name for name, on in (("cross-tokenizer terms (" + ", ".join(obj.crosstok_terms) + ")", bool(obj.crosstok_terms)),
                                  ("several teachers (teachers.extra)", several_teachers),
                                  ("hidden-state KD (hidden.weight / hidden.attention_relations.weight)", hidden_kd),
                                  (f"task.kind={task_kind}", task_kind != "causal_lm")) if on]
    if len(used) > 1:
        raise ValueError(f"{' and '.join(used)} cannot be combined in one run yet: keep one of them")


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    hidden: HiddenConfig = field(default_factory=HiddenConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    out_dir: str = "runs/latest"
    """Run directory: metrics.jsonl, report.md, checkpoints/ and final/ (the student) go here."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                  check_run: bool = True) -> "RunConfig":
        """``check_run=False`` checks keys, types and the objective only (for `potstill cache`, which needs no student)."""
        raw: dict = {}
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise FileNotFoundError(f"config file {path} does not exist")
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
            raw = parse_yaml(text, str(path)) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a mapping of sections at the top level")
        for item in overrides:
            apply_override(raw, item)
        return cls.from_dict(raw, source=str(path or "overrides"), check_run=check_run)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", check_run: bool = True) -> "RunConfig":
        cfg = build(cls, raw, source)
        cfg.validate() if check_run else cfg.objective()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def objective(self) -> Objective:
        if self.task.kind == "sentence_embedding":  # pooled-embedding terms (encoders/embedding.py)
            from potstill.encoders.embedding import embedding_objective

            return embedding_objective(self.task.embedding_objective)
        loss = self.loss
        return parse_objective(loss.objective, loss.temperature, loss.t_squared, loss.select, loss.temperature_schedule)

    def validate(self) -> None:
        from potstill.encoders.settings import check_settings as check_task_settings

        check_task_settings(self)  # task.kind and what the encoder kinds refuse (docs/encoders.md)
        obj = self.objective()  # parses and range-checks every term
        self._validate_reference(obj)
        if obj.needs_teacher and not (self.teacher.path or self.teacher.cache or self.teacher.server_url
                                      or self.teacher.self_distill != "none"):
            raise ValueError(f"loss.objective '{obj}' needs a teacher: set teacher.path, teacher.cache, teacher.server_url "
                             "or teacher.self_distill (or use objective 'ce')")
        from potstill import server_teacher  # its checks name the teacher.server_* keys

        server_teacher.check_settings(self, obj)
        if self.student.init_from_teacher_layers is not None and not self.teacher.path:
            raise ValueError("student.init_from_teacher_layers needs teacher.path (the teacher's weights)")
        if self.student.tokenizer and self.student.config is None:
            raise ValueError("student.tokenizer is for a fresh student (student.config); a student.path brings its own")
        sources = [self.student.path, self.student.config, self.student.init_from_teacher_layers]
        if sum(s is not None for s in sources) != 1:
            raise ValueError("set exactly one of student.path, student.config, student.init_from_teacher_layers")
        positive = {"train.max_steps": self.train.max_steps, "train.batch_size": self.train.batch_size,
                    "train.grad_accum": self.train.grad_accum,
                    "data.max_length": self.data.max_length, "eval.batch_size": self.eval.batch_size}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.loss.compile not in ("auto", "true", "false"):
            raise ValueError(f"loss.compile={self.loss.compile!r}: use auto, true or false")
        if self.loss.chunk_size < 0:
            raise ValueError(f"loss.chunk_size must be ≥ 0 (0 = auto), got {self.loss.chunk_size}")
        if self.train.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.schedule={self.train.schedule!r}: use cosine, linear or constant")
        if self.train.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite={self.train.on_nonfinite!r}: use stop or skip")
        check_precision_settings(self.train.precision, self.student.dtype, self.teacher.dtype)
        if self.train.warmup_steps is not None and self.train.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be ≥ 0 (or null = 5% of max_steps), got {self.train.warmup_steps}")
        from potstill import lora, monitor, runtime, trackers  # their checks name the config keys; imported here to keep loading light
        lora.check_settings(self.student.lora)
        trackers.tracker_names(self.train.report_to)
        runtime.check_settings(self)
        from potstill.onpolicy.settings import check_settings as check_generated_data_settings

        check_generated_data_settings(self)
        monitor.check_settings(self)
        from potstill.multiteacher.settings import check_settings as check_teachers_settings
        from potstill.hidden.settings import check_settings as check_hidden_settings, enabled as hidden_enabled

        check_teachers_settings(self)
        check_hidden_settings(self)
        _check_teacher_signal_kinds(obj, self.teachers.extra is not None, hidden_enabled(self), self.task.kind)

    def _validate_reference(self, obj: Objective) -> None:
        from potstill.losses.selection import SELECTORS

        needs = obj.selection is not None and SELECTORS.get(obj.selection.name).needs_reference
        if needs and not self.loss.reference:
            raise ValueError(f"loss.select={obj.selection} needs loss.reference (a reference model directory or hub id)")
        if self.loss.reference and not needs:
            raise ValueError("loss.reference is only used by the 'reference' token selector (loss.select=reference(...))")
        if obj.selection is not None and SELECTORS.get(obj.selection.name).needs_sequences and self.data.packing:
            raise ValueError(f"loss.select={obj.selection} weighs positions along each row's sequence: not with data.packing")


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf option, e.g. ('train.max_steps', '200', 'Optimiser steps.')."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
    return rows
