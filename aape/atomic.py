"""Atomic file writes: a reader (or a rerun after a crash) never sees half a file.

Every writer goes through `atomic_write`: write a temporary file in the target's folder, fsync it,
rename it over the target, fsync the folder. The file gets the mode a plain `open()` would give it
(0o666 less the umask), not mkstemp's private 0o600, so teammates and workers running as another
user can read the outputs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; some filesystems cannot open or sync a directory, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask. Reading it means setting it: the window is two calls, and a file another
    thread creates meanwhile gets the restrictive 0o077 rather than world-writable bits."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def default_mode(base: int = 0o666) -> int:
    """The mode `open()` (base 0o666) or `mkdir()` (base 0o777) gives a new file or folder."""
    return base & ~current_umask()


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)`, then put the finished file at `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # after writing: a writer may have replaced the file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    """The one JSON writer for outputs: indented, UTF-8, non-ASCII kept readable (class names)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_stream(path: Path | str, write: Callable[[Any], Any]) -> Path:
    """For writers that take an open binary file handle rather than a path."""

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return atomic_write(path, to_file)


def atomic_save_tensors(path: Path | str, tensors: dict[str, Any], metadata: dict[str, Any] | None = None) -> Path:
    """Save torch tensors as safetensors; metadata values are JSON-encoded (safetensors wants strings)."""
    from safetensors.torch import save_file  # here, not at the top: the JSON and text writers need no torch

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    # clone: safetensors refuses tensors that share storage (e.g. two slices of one buffer)
    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=meta))
