"""What a teacher-signal cache stores and how it is laid out on disk (docs/cache-format.md is the reference).

This module is pure format: the spec, file names, the per-mode encoding of one chunk of teacher logits into the
stored tensors, decoding them back, and the JSON records (per-shard sidecars, the manifest). ``cache.py`` runs
the teacher, writes shards and reads them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.targets import tail_mass, top_k_with_tail

FORMAT = "potstill-teacher-cache"
FORMAT_VERSION = 2  # 2: sample mode draws from a float64 CDF with float64 uniforms and stores log(p/r) in fp32
MANIFEST = "manifest.json"
MODES = ("dense", "topk", "sample")
MAX_SAMPLES = 255  # counts are stored as uint8


class CacheError(ValueError):
    """A cache that cannot be used as asked: wrong build, missing example, damaged or incomplete shard."""


@dataclass(frozen=True)
class CacheSpec:
    """What the cache holds. Everything here is recorded in the manifest and must match on resume."""

    mode: str  # dense | topk | sample
    vocab: int  # teacher vocabulary size V (the head is trimmed to these rows)
    k: int = 64  # topk: ids kept per position
    samples: int = 64  # sample: draws K per position (≤ 255)
    temperature: float = 1.0  # T of the stored teacher distribution softmax(z / T)
    proposal_temperature: float | None = None  # sample: draws from softmax(z / T_proposal); None = T
    seed: int = 0  # sample: draws of example e use a generator seeded from (seed, e)
    shard_size: int = 512  # examples per shard file
    # also store what a run whose student has another tokenizer needs beyond the rows (docs/cross-tokenizer.md): the
    # teacher's T = 1 log-prob of each of its own next tokens (label_logprobs (P,): ALM's chunk likelihoods, which
    # top-k rows may lack) and its token ids (input_ids (L,): the run checks its teacher-side tokens against them)
    cross_tokenizer: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CacheError(f"cache mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.vocab < 1:
            raise CacheError(f"cache vocab must be positive, got {self.vocab}")
        if self.mode == "topk" and not 1 <= self.k <= self.vocab:
            raise CacheError(f"topk cache needs 1 ≤ k ≤ vocab ({self.vocab}), got k={self.k}")
        if self.mode == "sample" and not 1 <= self.samples <= MAX_SAMPLES:
            raise CacheError(f"sample cache needs 1 ≤ samples ≤ {MAX_SAMPLES} (counts are uint8), got {self.samples}")
        if self.temperature <= 0 or (self.proposal_temperature is not None and self.proposal_temperature <= 0):
            raise CacheError("cache temperatures must be positive")
        if self.shard_size < 1:
            raise CacheError(f"shard_size must be at least 1, got {self.shard_size}")

    @property
    def proposal(self) -> float:
        return self.temperature if self.proposal_temperature is None else self.proposal_temperature

    @property
    def importance_weighted(self) -> bool:
        """Sample mode with r ≠ p: each stored id also carries its log importance ratio log p − log r."""
        return self.mode == "sample" and self.proposal != self.temperature

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def id_dtype(vocab: int) -> torch.dtype:
    """The narrowest id type that holds every id: 2 bytes up to 65,536 ids, else 4."""
    return torch.uint16 if vocab <= 65536 else torch.int32


def tensor_layout(spec: CacheSpec) -> dict[str, str]:
    """Stored tensor name → 'dtype (shape)' per example, P = L − 1 predicted positions, U = max unique ids."""
    ids = str(id_dtype(spec.vocab)).removeprefix("torch.")
    extra = {"label_logprobs": "float32 (P,)", "input_ids": f"{ids} (L,)"} if spec.cross_tokenizer else {}
    return _mode_layout(spec) | extra


def _mode_layout(spec: CacheSpec) -> dict[str, str]:
    ids = str(id_dtype(spec.vocab)).removeprefix("torch.")
    if spec.mode == "dense":  # the exact reference mode: fp32, so training from it equals the live teacher
        return {"logprobs": f"float32 (P, {spec.vocab})"}
    if spec.mode == "topk":
        return {"ids": f"{ids} (P, {spec.k})", "logprobs": f"float16 (P, {spec.k})", "tail_mass": "float16 (P,)"}
    layout = {"ids": f"{ids} (P, U)", "counts": "uint8 (P, U)"}
    if spec.importance_weighted:
        layout |= {"log_ratio": "float32 (P, U)"}
    return layout


def payload_bytes_per_position(spec: CacheSpec, unique: float | None = None) -> float:
    """Tensor bytes per predicted position (file headers excluded). ``unique``: sample mode's padded U (≤ K)."""
    id_bytes = torch.empty((), dtype=id_dtype(spec.vocab)).element_size()
    if spec.cross_tokenizer:  # + label log-prob (fp32) and token id per position
        return 4 + id_bytes + payload_bytes_per_position(replace(spec, cross_tokenizer=False), unique)
    if spec.mode == "dense":
        return 4 * spec.vocab
    if spec.mode == "topk":
        return spec.k * id_bytes + 2 * spec.k + 2
    per_id = id_bytes + 1 + (4 if spec.importance_weighted else 0)
    return (spec.samples if unique is None else unique) * per_id


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sidecar_file(index: int) -> str:
    return f"shard-{index:05d}.json"


def tensor_key(example_id: int, name: str) -> str:
    return f"{example_id}/{name}"


def build_key(spec: CacheSpec, fingerprints: dict[str, str]) -> str:
    """One hash of everything that decides a shard's bytes (besides its examples): resume refuses a mismatch."""
    record = {"format_version": FORMAT_VERSION, "spec": spec.to_dict(), "fingerprints": dict(sorted(fingerprints.items()))}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def example_seed(seed: int, example_id: int) -> int:
    """The draw seed of one example: a hash of (cache seed, example id), so batching and sharding never matter."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def example_uniforms(spec: CacheSpec, example_id: int, positions: int) -> Tensor:
    """The (P, K) float64 uniforms that drive inverse-CDF sampling of one example. A CPU generator makes them
    device-independent; float64 (53 random bits) so that no interval of the CDF is finer than their grid."""
    gen = torch.Generator().manual_seed(example_seed(spec.seed, example_id))
    return torch.rand((positions, spec.samples), generator=gen, dtype=torch.float64)


# ---- encoding: teacher logits of one chunk of positions → stored tensors --------------------------------------

def encode_chunk(logits: Tensor, spec: CacheSpec, uniforms: Tensor | None = None,
                 next_ids: Tensor | None = None) -> dict[str, Tensor]:
    """Encode fp32 logits (n, V) of n predicted positions; results are on the CPU. Sample mode returns its
    sorted draws (n, K) (plus each draw's log p/r when r ≠ p); ``compact_samples`` turns an example's draws into
    ids/counts. ``uniforms`` (n, K): ``example_uniforms`` rows of these positions. ``next_ids`` (n,): the tokens
    that follow these positions, needed with ``spec.cross_tokenizer``."""
    out = _encode_mode(logits, spec, uniforms)
    if spec.cross_tokenizer:  # at T = 1 whatever spec.temperature is: chunk likelihoods are model likelihoods
        out["label_logprobs"] = F.log_softmax(logits.float(), -1).gather(-1, next_ids.to(logits.device)[:, None])[:, 0].cpu()
    return out


def _encode_mode(logits: Tensor, spec: CacheSpec, uniforms: Tensor | None) -> dict[str, Tensor]:
    logp = F.log_softmax(logits / spec.temperature, dim=-1)  # (n, V): the teacher at T
    if spec.mode == "dense":
        return {"logprobs": logp.float().cpu()}
    if spec.mode == "topk":
        return topk_tensors(*top_k_with_tail(logp, spec.k)[:2])
    draws = inverse_cdf(proposal_cdf(logits, spec), uniforms).sort(-1).values  # (n, K)
    out = {"draws": draws.cpu()}
    if spec.importance_weighted:
        out["log_ratio"] = log_ratio(logits, spec, draws).float().cpu()
    return out


def proposal_cdf(logits: Tensor, spec: CacheSpec) -> Tensor:
    """(n, V) float64 cumulative sums of r = softmax(z / T_proposal). In float64 an id's interval is its r to a few
    ulps of 1 (~1e-16), so every id with r ≳ 1e-15 is reachable; in fp32 (ulp 6e-8 above 1/2) an id of r = 1e-8
    would get an interval of 0 or 6e-8, and one of 1e-6 one off by up to 3 %. docs/cache-format.md: precision."""
    return F.softmax(logits.double() / spec.proposal, dim=-1).cumsum(-1)


def inverse_cdf(cdf: Tensor, uniforms: Tensor) -> Tensor:
    """(n, K) ids: id i is drawn iff cdf[i-1] ≤ u·cdf[-1] < cdf[i] (so an id of probability 0 never is)."""
    points = uniforms.to(cdf) * cdf[:, -1:]  # scaled by the total: no renormalisation of r needed
    return torch.searchsorted(cdf, points, right=True).clamp_max(cdf.shape[-1] - 1)


def log_ratio(logits: Tensor, spec: CacheSpec, ids: Tensor) -> Tensor:
    """(n, K) float64 log p − log r of ``ids``: z·(1/T − 1/T_r) − (logsumexp(z/T) − logsumexp(z/T_r)), in float64
    (the normalisers are sums over the whole vocabulary, which is why the ratio is stored, not recomputed)."""
    z = logits.double()
    normalisers = z.div(spec.temperature).logsumexp(-1, keepdim=True) - z.div(spec.proposal).logsumexp(-1, keepdim=True)
    return z.gather(-1, ids) * (1 / spec.temperature - 1 / spec.proposal) - normalisers


def topk_tensors(ids: Tensor, logprobs: Tensor) -> dict[str, Tensor]:
    """The stored top-k tensors from ids (n, k) and their fp32 log-probs (n, k), most likely first: fp16 log-probs
    and the tail mass 1 − Σ p computed from the fp32 values (``losses.targets.tail_mass``), on the CPU. The HF
    builder and the vLLM capture both store through here."""
    tail = tail_mass(logprobs)
    return {"ids": ids.cpu(), "logprobs": logprobs.half().cpu(), "tail_mass": tail.half().cpu()}


def compact_samples(draws: Tensor, per_draw: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sorted draws (P, K) → unique ids (P, U) and counts (P, U), padded with id 0 / count 0 (and value 0) to
    U = the most unique ids at any position of the example. ``per_draw`` values (P, K) follow their ids."""
    positions, k = draws.shape
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(-1) - 1  # (P, K): the column of each draw's unique id
    width = int(slot[:, -1].max()) + 1 if positions and k else 0
    ids = torch.zeros(positions, width, dtype=torch.long).scatter_(1, slot, draws)
    counts = torch.zeros(positions, width, dtype=torch.long).scatter_add_(1, slot, torch.ones_like(draws))
    out = {"ids": ids, "counts": counts.to(torch.uint8)}
    for name, values in per_draw.items():  # duplicates of an id carry the same value, so scatter is exact
        out[name] = torch.zeros(positions, width, dtype=values.dtype).scatter_(1, slot, values)
    return out


def finish_example(parts: list[dict[str, Tensor]], spec: CacheSpec, input_ids: list[int] | None = None) -> dict[str, Tensor]:
    """Concatenate an example's chunk encodings along positions and give ids their narrow on-disk type; with
    ``spec.cross_tokenizer`` also store the example's ``input_ids``."""
    joined = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    if spec.mode == "sample":
        draws = joined.pop("draws")
        per_position = {name: joined.pop(name) for name in ("label_logprobs",) if name in joined}
        joined = compact_samples(draws, joined) | per_position
    if spec.cross_tokenizer:
        joined["input_ids"] = torch.tensor(input_ids, dtype=torch.long)
    for name in ("ids", "input_ids"):
        if name in joined:
            joined[name] = joined[name].to(id_dtype(spec.vocab))
    return joined


def decode(name: str, stored: Tensor) -> Tensor:
    """Stored tensor → what a loss uses: ids (and input_ids) as int64; log-probs, tail mass and counts as float32."""
    return stored.to(torch.int64) if name in ("ids", "input_ids") else stored.float()


# ---- integrity and records -------------------------------------------------------------------------------------

def signal_problem(signal: dict[str, Tensor], spec: CacheSpec) -> str | None:
    """What is wrong with one example's decoded tensors, or None: NaN or +inf anywhere, −inf outside log-probs
    (log 0 is a legal log-prob), ids outside the vocabulary, sample counts that do not sum to K."""
    for name, t in signal.items():
        if t.is_floating_point():
            bad = t.isnan() | (t == float("inf"))
            if not name.endswith("logprobs"):
                bad |= t == float("-inf")
            if bool(bad.any()):
                return f"its {name} holds NaN or inf"
    for name in ("ids", "input_ids"):
        ids = signal.get(name)
        if ids is not None and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < spec.vocab):
            return f"its {name} lie outside the vocabulary [0, {spec.vocab})"
    counts = signal.get("counts")
    if counts is not None and bool((counts.sum(-1) != spec.samples).any()):
        return f"its counts do not sum to K = {spec.samples}"
    return None


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def dumps(record: dict) -> str:
    """Deterministic JSON (no timestamps, fixed key order), so rebuilt caches are byte-identical."""
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def read_json(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A manifest or sidecar; garbled bytes, invalid JSON or a missing field → one CacheError naming the file.
    Either file is rewritten by re-running the build (`potstill cache` resumes and keeps finished shards)."""
    fix = "delete it and re-run `potstill cache` (it resumes, keeping finished shards)"
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{path} is not valid JSON ({getattr(exc, 'msg', None) or exc.reason}): {fix}") from None
    missing = [key for key in required if not isinstance(record, dict) or key not in record]
    if missing:
        raise CacheError(f"{path} is damaged (no {', '.join(missing)}): {fix}")
    return record


def example_digest(input_ids: list[int]) -> str:
    """What the stored signal depends on: the example's token ids (the teacher sees nothing else)."""
    return hashlib.sha256(torch.tensor(input_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


def manifest_record(spec: CacheSpec, fingerprints: dict[str, str], sidecars: list[dict]) -> dict:
    """The manifest: the spec, the fingerprints and every shard's examples, size and checksum."""
    positions = sum(s["positions"] for s in sidecars)
    total = sum(s["bytes"] for s in sidecars)
    payload = sum(s["tensor_bytes"] for s in sidecars)
    per_position = lambda n: round(n / positions, 3) if positions else 0.0  # noqa: E731
    keep = ("file", "example_ids", "lengths", "digests", "positions", "tensor_bytes", "bytes", "sha256")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "build_key": build_key(spec, fingerprints),
        "spec": spec.to_dict(),
        "fingerprints": dict(sorted(fingerprints.items())),
        "id_dtype": str(id_dtype(spec.vocab)).removeprefix("torch."),
        "tensors": tensor_layout(spec),
        "n_examples": sum(len(s["example_ids"]) for s in sidecars),
        "n_positions": positions,
        "total_bytes": total,
        "tensor_bytes": payload,
        "bytes_per_position": per_position(total),
        "tensor_bytes_per_position": per_position(payload),
        "shards": [{key: s[key] for key in keep} for s in sidecars],
    }
