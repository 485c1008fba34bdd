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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

from aape.errors import AAPEError

log = logging.getLogger(__name__)

MODES = ("auto", "off")
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_state: dict[str, bool] = {}


class AllocatorSettingError(AAPEError, ValueError):
    """AAPE_RETAIN_MEMORY holds a value it does not know."""


def mode() -> str:
    value = os.environ.get("AAPE_RETAIN_MEMORY", "auto").strip().lower()
    if value not in MODES:
        raise AllocatorSettingError(f"AAPE_RETAIN_MEMORY={value!r} is not one of {', '.join(MODES)}; unset it or set it to 'off'")
    return value


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
