"""Keep freed memory in the process, so large CPU tensors stop paying page faults on every batch.

glibc's malloc serves every block above its mmap threshold (128 KiB at first, adjusted up to 32 MiB)
with a fresh mmap and gives it back to the kernel on free; what it frees at the top of the heap
beyond the trim threshold it returns too. A CLIP encoder on the CPU allocates the same tens of
megabytes per layer and batch (ViT-B-16 at batch 8: a 19 MB MLP activation, twelve times a
batch), so each batch touches fresh pages and the kernel zero-fills them first: 30,000-39,000 page
faults per batch of 8 here (ru_minflt), none with freed memory kept. What that costs depends on the
machine (faults take a lock per process, so they weigh more with more threads); on this 2-core VM
the speed-up was within its drift (+9% mean of 6 alternating fresh-process pairs, 0.88x in one
benchmark run: benchmarks/bench_features.py measures it side by side). PyTorch's CPU tuning guide
suggests jemalloc or tcmalloc for the same reason; this needs neither: two `mallopt` calls (no
mmap for large blocks, no trimming), made once, for the whole process.

The price: memory the process has freed is reused by it but not returned to the system until it
exits, so its resident size stays at its peak (an extraction's peak is one batch's activations).
`AAPE_RETAIN_MEMORY=off` leaves malloc as it is; elsewhere than Linux with glibc this does nothing.
The outputs are bit-identical either way (only where memory comes from changes).

`exit_with` is the other end of a process's life: an entry point run through it skips the cyclic
garbage collection of interpreter shutdown, which walks every object torch and the stages created
(2-3 s per process here, paid by every DVC stage and every Dask worker as it closes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform
from typing import Callable, NoReturn

from aape import switches
from aape.errors import AAPEError

log = logging.getLogger(__name__)

MODES = ("auto", "off")
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_state: dict[str, bool] = {}


class AllocatorSettingError(AAPEError, ValueError):
    """AAPE_RETAIN_MEMORY holds a value it does not know."""


def mode() -> str:
    return switches.choice("AAPE_RETAIN_MEMORY", MODES, AllocatorSettingError, hint="unset it or set it to 'off'")


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make this process's malloc keep what it frees (once; later calls return the first answer).
    True when the setting is in force."""
    if "on" in _state:
        return _state["on"]
    on = False
    libc = _glibc() if mode() == "auto" else None
    if libc is not None:
        # both return 1 on success; trim threshold: the largest value the int argument holds
        on = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        if not on:
            log.warning("glibc refused the allocator settings; CPU encoding keeps the default malloc (slower)")
    _state["on"] = on
    return on


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Run a process's entry point, then exit with its status (or its SystemExit) without shutdown's collection.

    Freezing moves every live object out of the collector's reach; the interpreter's exit then frees
    them by reference count and module teardown as before (atexit handlers, log flushing and open
    files are untouched), but no longer searches them for cycles, which for a process that has
    imported torch took 2.4 s of a 2.9 s exit here. Only for processes about to end: frozen cycles
    are never collected.
    """
    try:
        code = main()
    finally:
        gc.freeze()
    raise SystemExit(code)
