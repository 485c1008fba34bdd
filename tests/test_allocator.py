"""The allocator setting behind CPU encoding's speed (aape/allocator.py): freed memory stays in the process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from aape import allocator

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# In a fresh process: malloc's statistics around a 64 MiB tensor, before and after it is freed.
PROBE = """
import ctypes, json, sys, torch
from aape.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
on = retain_freed_memory()
before = libc.mallinfo2()
t = torch.ones(16 * 1024 * 1024)  # 64 MiB
held = libc.mallinfo2()
del t
after = libc.mallinfo2()
print(json.dumps({"on": on, "mmapped_while_held": held.hblkhd - before.hblkhd, "heap_free_after": after.fordblks}))
"""
MIB64 = 64 * 1024 * 1024


def _probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_large_tensors_come_from_the_heap_and_stay_there_when_freed():
    kept = _probe(AAPE_RETAIN_MEMORY="auto")
    assert kept["on"] is True
    assert kept["mmapped_while_held"] == 0  # no mmap for the 64 MiB block
    assert kept["heap_free_after"] >= MIB64  # freed, but kept for the next batch instead of returned


@glibc_only
def test_off_leaves_glibc_defaults_which_map_and_unmap_large_blocks():
    default = _probe(AAPE_RETAIN_MEMORY="off")
    assert default["on"] is False
    assert default["mmapped_while_held"] >= MIB64  # the block was its own mapping: fresh pages every time
    assert default["heap_free_after"] < MIB64


def test_an_unknown_setting_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setenv("AAPE_RETAIN_MEMORY", "yes")
    with pytest.raises(allocator.AllocatorSettingError, match=r"AAPE_RETAIN_MEMORY='yes' is not one of auto, off; unset it"):
        allocator.mode()


@glibc_only
def test_loading_a_backbone_for_the_cpu_applies_it(monkeypatch):
    from aape.backbone import load_backbone
    from aape.config import BackboneConfig

    monkeypatch.setattr(allocator, "_state", {})
    load_backbone(BackboneConfig(model="aape-tiny", pretrained="random-init"), device="cpu")
    assert allocator._state == {"on": True}


# Process exit (allocator.exit_with): the status and the atexit handlers stay, the shutdown's cycle search goes.

EXITING = """
import atexit, gc, sys
from aape.allocator import exit_with

atexit.register(lambda: print("atexit ran, objects frozen:", gc.get_freeze_count() > 0, flush=True))
kind = sys.argv[1]

def main():
    if kind == "raise":
        raise RuntimeError("boom")
    return 5

exit_with(main)
"""


@pytest.mark.parametrize("kind, status, stderr_has", [("status", 5, ""), ("raise", 1, "RuntimeError: boom")])
def test_a_process_run_through_exit_with_keeps_its_status_and_atexit_handlers_with_its_objects_frozen(kind, status, stderr_has):
    done = subprocess.run([sys.executable, "-c", EXITING, kind], capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    assert done.stdout.strip() == "atexit ran, objects frozen: True"
    assert stderr_has in done.stderr


def test_the_aape_command_and_the_dask_workers_teardown_freeze_before_exiting(monkeypatch):
    from aape import cli
    from flows import dask_worker_setup

    frozen = []
    monkeypatch.setattr(allocator.gc, "freeze", lambda: frozen.append("cli"))
    monkeypatch.setattr(sys, "argv", ["aape", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.entry()
    assert exit_info.value.code == 0 and frozen == ["cli"]

    import gc

    monkeypatch.setattr(gc, "freeze", lambda: frozen.append("worker"))
    dask_worker_setup.dask_teardown(None)
    assert frozen == ["cli", "worker"]
