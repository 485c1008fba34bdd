"""A content-keyed cache of encoded features under `run.cache_dir/features/`.

One entry per independently reusable result (one image view of one manifest, one set of texts):

    <cache_dir>/features/<kind>-<digest>/
        key.json               what determines the result, readable (written first)
        features.safetensors   the tensors (written to a temporary file, fsynced, renamed)
        COMPLETE               size and sha256 of features.safetensors (written last)

An entry without COMPLETE, or whose COMPLETE does not match the data file, is treated as absent
and recomputed: an interrupted run can leave temporary or half-written files, never a complete-looking
entry. The digest is a hash of key.json's canonical form, and key.json is compared on load as well.

Concurrent runs sharing a cache take `<kind>-<digest>.lock` (aape.locks) around look-up and
computation: the second run waits for the first, then loads the entry it wrote instead of
computing it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from aape.atomic import atomic_write_json
from aape.atomic import atomic_save_tensors
from aape.features.bundle import read_metadata
from aape.locks import exclusive_lock

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DATA_FILE = "features.safetensors"
KEY_FILE = "key.json"
MARKER_FILE = "COMPLETE"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CachedResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]


class CacheEntry:
    """One cache entry, addressed by the digest of its key."""

    def __init__(self, cache_dir: Path | str, kind: str, key: dict[str, Any]) -> None:
        self.key = {"cache_version": CACHE_VERSION, "kind": kind, **key}
        self.digest = sha256_hex(canonical_json(self.key))[:24]
        self.dir = Path(cache_dir) / "features" / f"{kind}-{self.digest}"

    @property
    def data_path(self) -> Path:
        return self.dir / DATA_FILE

    @property
    def marker_path(self) -> Path:
        return self.dir / MARKER_FILE

    @property
    def lock_path(self) -> Path:
        return self.dir.with_name(f"{self.dir.name}.lock")  # beside the entry, not inside it

    def locked(self) -> ContextManager[None]:
        """Exclusive use of this entry across processes and threads, while it is looked up and computed."""
        return exclusive_lock(self.lock_path, self.dir.name)

    def is_complete(self) -> bool:
        return self._check() is None

    def _check(self) -> str | None:
        """None when the entry is complete and intact, else why it is not."""
        if not self.marker_path.is_file():
            return "absent" if not self.dir.exists() else "incomplete (no COMPLETE marker: an interrupted write)"
        try:
            marker = json.loads(self.marker_path.read_text())
            stored_key = json.loads((self.dir / KEY_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return f"unreadable marker or key ({exc})"
        if canonical_json(stored_key) != canonical_json(self.key):
            return "key.json differs from the expected key (digest collision or edited entry)"
        if not self.data_path.is_file() or self.data_path.stat().st_size != marker.get("bytes"):
            return "data file missing or of the wrong size"
        if _file_sha256(self.data_path) != marker.get("sha256"):
            return "data file checksum mismatch"
        return None

    def load(self, quiet: bool = False) -> CachedResult | None:
        """The cached tensors, or None (logging why, unless `quiet`) when the entry is absent, partial or corrupt.

        Safe without the lock: every file is renamed into place whole and the marker (with the data's
        checksum) is written last, so a read racing a rewrite sees a complete entry or none."""
        problem = self._check()
        if problem is not None:
            if problem != "absent" and not quiet:
                log.warning("cache entry %s is %s; recomputing it", self.dir, problem)
            return None
        try:
            return CachedResult(load_file(str(self.data_path)), read_metadata(self.data_path))
        except (SafetensorError, OSError) as exc:
            if not quiet:
                log.warning("cache entry %s cannot be read (%s); recomputing it", self.dir, exc)
            return None

    def save(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        """Write the entry so that it counts as complete only once everything is on disk."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.marker_path.unlink(missing_ok=True)  # an entry being rewritten is incomplete meanwhile
        atomic_write_json(self.dir / KEY_FILE, self.key)
        atomic_save_tensors(self.data_path, tensors, metadata)
        marker = {
            "bytes": self.data_path.stat().st_size,
            "sha256": _file_sha256(self.data_path),
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_json(self.marker_path, marker)


Compute = Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]


def load_or_compute(entry: CacheEntry, compute: Compute, usable: Callable[[CachedResult], bool] = lambda result: True) -> tuple[CachedResult, bool]:
    """(the entry's result, whether it was computed now): loaded when complete and `usable`, else
    computed by `compute() -> (tensors, metadata)` and saved, all under the entry's lock. A complete
    entry is read without the lock first, so concurrent runs that only read (experiment cells sharing
    one dataset's features) do not wait for each other."""
    cached = entry.load(quiet=True)
    if cached is not None and usable(cached):
        return cached, False
    with entry.locked():
        cached = entry.load()
        if cached is not None and usable(cached):
            return cached, False
        tensors, metadata = compute()
        entry.save(tensors, metadata)
        return CachedResult(tensors, metadata), True
