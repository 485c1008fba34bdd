"""Exclusive per-entry locks, so concurrent runs on one cache compute each entry once.

A run takes the lock of an entry before looking it up; a second run wanting the same entry waits
(logging that once), then finds the finished entry and reuses it. The locks are `fcntl.flock`
locks on `<entry>.lock` files (Linux and macOS). Such a lock belongs to the open file: the kernel
drops it when the holder closes it, exits or is killed, so a crashed run never leaves a lock that
blocks the next one. Lock files stay behind (a few bytes): deleting one while another process waits
on it would let a third process lock a new file of the same name at the same time.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from aape.atomic import default_mode

log = logging.getLogger(__name__)

_held: set[int] = set()  # descriptors of the locks this process holds


def _forget_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the parent's open lock files, and a flock lock
    # lasts until every descriptor of it is closed: close the child's copies so that the lock
    # goes when the parent releases it, not when the last worker exits.
    for fd in list(_held):
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_inherited_locks)


@contextmanager
def exclusive_lock(lock_path: Path | str, what: str) -> Iterator[None]:
    """Hold the lock on `lock_path` for the block; `what` names the entry in the waiting message.

    Two opens of the file, even by two threads of one process, exclude each other (flock locks
    belong to the open file description), so the lock serves threads as well as processes."""
    with exclusive_locks([(lock_path, what)]):
        yield


@contextmanager
def exclusive_locks(named: Iterable[tuple[Path | str, str]]) -> Iterator[None]:
    """Several (lock path, what) locks at once, taken in path order so that two runs wanting
    overlapping sets cannot each hold one the other waits for; the wait is logged once."""
    unique = dict(sorted((str(Path(path)), what) for path, what in named))
    fds: list[int] = []
    announced = False
    try:
        for path, what in unique.items():
            fds.append(_open_lock_file(Path(path)))
            if not _try_lock(fds[-1]):
                if not announced:
                    log.info("waiting for another run computing %s", what)
                    announced = True
                fcntl.flock(fds[-1], fcntl.LOCK_EX)
        yield
    finally:
        for fd in reversed(fds):
            _held.discard(fd)
            os.close(fd)  # releases the lock


def _open_lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
    _held.add(fd)
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
