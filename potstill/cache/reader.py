"""Reading a finished teacher-signal cache: lazily, mmap'd, by example id, with every check a training run needs
(manifest format and version, the expected fingerprints and spec, shard size and sha256, decoded values).
Layout and integrity rules: docs/cache-format.md; ``store.py`` builds caches."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from potstill.cache.format import (FORMAT, FORMAT_VERSION, MANIFEST, CacheError, CacheSpec, decode, read_json,
                                   sha256_file, signal_problem, tensor_key)

REBUILD_HINT = "rebuild the cache with `potstill cache` (or point to a cache built for this run)"
RESUME_HINT = "delete it and re-run `potstill cache` (it resumes and rebuilds only missing shards)"
MANIFEST_KEYS = ("format", "format_version", "spec", "fingerprints", "tensors", "shards", "bytes_per_position")


def _same(recorded, expected) -> bool:
    if str(recorded) == str(expected):
        return True
    try:
        return float(recorded) == float(expected)
    except (TypeError, ValueError):
        return False


class CacheReader:
    """Lazy, mmap'd reads of a finished cache by example id; shards are opened (and checksummed) on first use.
    Every problem with the files (missing, truncated, corrupted, garbled manifest, NaN/inf written by a faulty
    build) is a ``CacheError`` naming the file and what to do; ``check_shards`` finds them before training."""

    def __init__(self, out_dir, *, expect: dict[str, str] | None = None, verify: bool = True):
        self.dir = Path(out_dir)
        self.verify = verify
        self.manifest = self._load_manifest()
        path = self.dir / MANIFEST
        try:
            self.spec = CacheSpec.from_dict(self.manifest["spec"])
            self._shard_of: dict[int, int] = {}
            self._length_of: dict[int, int] = {}
            self._digest_of: dict[int, str] = {}
            for index, shard in enumerate(self.manifest["shards"]):
                if not {"file", "bytes", "sha256"} <= shard.keys():  # needed when the shard is opened
                    raise KeyError(f"shard record {index} lacks file, bytes or sha256")
                for example_id, length, digest in zip(shard["example_ids"], shard["lengths"], shard["digests"], strict=True):
                    self._shard_of[example_id], self._length_of[example_id] = index, length
                    self._digest_of[example_id] = digest
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{path} is damaged ({type(exc).__name__}: {exc}): {RESUME_HINT}") from None
        self._check_expectations(expect or {})
        self._open: dict[int, object] = {}

    def _load_manifest(self) -> dict:
        path = self.dir / MANIFEST
        if not path.exists():
            raise CacheError(f"{self.dir} has no {MANIFEST}: the cache is not built or its build did not finish; "
                             "re-run `potstill cache` (it resumes) or finalize_manifest once every rank is done")
        manifest = read_json(path, MANIFEST_KEYS)
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')}; "
                             f"this potstill reads {FORMAT!r} version {FORMAT_VERSION}: {REBUILD_HINT}")
        return manifest

    def _check_expectations(self, expect: dict[str, str]) -> None:
        fingerprints, spec = self.manifest["fingerprints"], self.manifest["spec"]
        for field, expected in expect.items():
            if field in fingerprints:
                if not _same(fingerprints[field], expected):
                    raise CacheError(f"cache was built with {field} fingerprint {fingerprints[field]}, "
                                     f"this run has {expected}: {REBUILD_HINT}")
            elif field in spec:
                if not _same(spec[field], expected):
                    raise CacheError(f"cache was built with {field}={spec[field]}, this run has {expected}: {REBUILD_HINT}")
            else:
                raise CacheError(f"cache at {self.dir} records no {field!r} (fingerprints: "
                                 f"{', '.join(fingerprints) or 'none'}; spec: {', '.join(spec)}): {REBUILD_HINT}")

    @property
    def example_ids(self) -> list[int]:
        return list(self._shard_of)

    def has(self, example_id: int) -> bool:
        return int(example_id) in self._shard_of

    def length(self, example_id: int) -> int:
        """Tokens L of the example (the cache holds L − 1 predicted positions)."""
        return self._length_of[self._shard_index(example_id)[1]]

    def digest(self, example_id: int) -> str:
        """The token-id digest of the example as it was cached (``format.example_digest``)."""
        return self._digest_of[self._shard_index(example_id)[1]]

    def bytes_per_position(self) -> float:
        """Shard-file bytes (headers included) per predicted position, as measured at build time."""
        return float(self.manifest["bytes_per_position"])

    def _shard_index(self, example_id: int) -> tuple[int, int]:
        example_id = int(example_id)
        if example_id not in self._shard_of:
            raise CacheError(f"example {example_id} is not in the cache (built over {len(self._shard_of)} examples) "
                             f"at {self.dir}: the data differs from the cache's; {REBUILD_HINT}")
        return self._shard_of[example_id], example_id

    def check_shards(self, example_ids) -> None:
        """Open (and with ``verify`` checksum and scan) every shard holding these examples — before training."""
        for index in sorted({self._shard_index(e)[0] for e in example_ids}):
            self._shard(index)

    def _shard(self, index: int):
        if index not in self._open:
            record = self.manifest["shards"][index]
            path = self.dir / record["file"]
            self._check_shard_file(path, record)
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CacheError(f"shard {path} cannot be read ({exc}): {RESUME_HINT}") from None
            if self.verify:  # the bytes are the ones written; are the values sane? (a faulty build could write NaN)
                for example_id in record["example_ids"]:
                    self._decoded(handle, path, example_id)
            self._open[index] = handle
        return self._open[index]

    def _check_shard_file(self, path: Path, record: dict) -> None:
        if not path.exists():
            raise CacheError(f"shard {path} is missing: re-run `potstill cache` (it rebuilds only missing shards)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CacheError(f"shard {path} is truncated or was replaced ({size} bytes, the manifest says "
                             f"{record['bytes']}): {RESUME_HINT}")
        if self.verify and sha256_file(path) != record["sha256"]:
            raise CacheError(f"shard {path} is corrupted (its sha256 differs from the manifest's): {RESUME_HINT}")

    def _decoded(self, handle, path: Path, example_id: int) -> dict[str, Tensor]:
        try:
            signal = {name: decode(name, handle.get_tensor(tensor_key(example_id, name))) for name in self.manifest["tensors"]}
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CacheError(f"shard {path} cannot be read at example {example_id} ({exc}): {RESUME_HINT}") from None
        problem = signal_problem(signal, self.spec)
        if problem:
            raise CacheError(f"shard {path} is damaged at example {example_id} ({problem}; written by a faulty "
                             f"build): {RESUME_HINT}")
        return signal

    def read(self, example_id: int) -> dict[str, Tensor]:
        """The example's stored tensors (P = L − 1 rows each), decoded: ids int64; log-probs, tail, counts float32."""
        index, example_id = self._shard_index(example_id)
        return self._decoded(self._shard(index), self.dir / self.manifest["shards"][index]["file"], example_id)

    def read_tensor(self, example_id: int, name: str) -> Tensor:
        """One stored tensor of the example, decoded (e.g. a cross-tokenizer cache's ``input_ids``)."""
        index, example_id = self._shard_index(example_id)
        try:
            return decode(name, self._shard(index).get_tensor(tensor_key(example_id, name)))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CacheError(f"shard {self.dir / self.manifest['shards'][index]['file']} has no {name} for example "
                             f"{example_id} ({exc}): {RESUME_HINT}") from None

    def close(self) -> None:
        self._open.clear()
