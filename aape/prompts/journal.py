"""The answer journal: append-only JSONL, fsynced per response, so no paid answer is ever lost.

Each line is one answer, keyed by a request key that hashes everything that determines it (source,
model, endpoint, system message, question, template, class, sample index, temperature, max tokens).
A rerun reads the journal and requests only the keys it lacks; a half-written last line (a kill
during a write) is skipped and its answer requested again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from aape.atomic import fsync_dir

log = logging.getLogger(__name__)


def request_key(**fields: Any) -> str:
    """A stable hash of the fields that determine an answer (order-independent)."""
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def seed_from_key(key: str) -> int:
    """A per-sample sampling seed, so answers are reproducible where the server honours `seed`."""
    return int(key[:8], 16) % (2**31 - 1)


@dataclass(frozen=True)
class SampleJob:
    """One answer to obtain: sample `sample_index` of `question` (a template filled with a class)."""

    class_index: int
    class_name: str
    template: str
    question: str
    sample_index: int
    key: str


class Journal:
    """Append-only JSONL of answers (dicts with at least 'key')."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: Any = None

    def load(self) -> dict[str, dict[str, Any]]:
        """key -> entry; the first entry of a key wins; unreadable lines are skipped with a warning."""
        entries: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return entries
        bad = 0
        with self.path.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    key = entry["key"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                entries.setdefault(key, entry)
        if bad:
            log.warning("journal %s: skipped %d unreadable line(s) (a write cut short); their answers are requested again", self.path, bad)
        return entries

    def append(self, entries: Iterable[dict[str, Any]]) -> None:
        """Write the entries as lines in one write, then fsync: they survive a kill from here on."""
        data = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in entries)
        if not data:
            return
        handle = self._open()
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> Any:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            handle = self.path.open("ab")
            if not created and handle.tell() > 0 and not _ends_with_newline(self.path):
                handle.write(b"\n")  # seal a line cut short by a kill, so the next entry stays readable
            if created:
                fsync_dir(self.path.parent)
            self._handle = handle
        return self._handle


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"

