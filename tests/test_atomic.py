"""Atomic writes: a failed write leaves the previous file intact and no temporary file behind; the
file gets the mode the umask asks for, not the temporary file's private 0o600."""

import json
import os
import stat

import pytest

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aape.atomic import atomic_save_tensors, atomic_write, atomic_write_json, atomic_write_stream, atomic_write_text
from aape.features.bundle import read_metadata


def test_writes_land_whole(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_stream(tmp_path / "b.bin", lambda handle: handle.write(b"\x00\x01"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")

    def crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def _write_every_way(folder):
    atomic_write_text(folder / "a.txt", "x")
    atomic_write_json(folder / "b.json", {"a": 1})
    atomic_write_stream(folder / "c.bin", lambda handle: handle.write(b"x"))
    atomic_write(folder / "d.bin", lambda tmp: tmp.write_bytes(b"x"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_written_files_get_the_mode_the_umask_asks_for(tmp_path, umask, mode):
    (tmp_path / "d.bin").write_bytes(b"old")
    os.chmod(tmp_path / "d.bin", 0o600)  # an output of an earlier run: rewriting it fixes the mode
    before = os.umask(umask)
    try:
        _write_every_way(tmp_path)
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.txt", "b.json", "c.bin", "d.bin"], mode)


def test_json_outputs_are_utf8_with_names_left_readable(tmp_path):
    target = atomic_write_json(tmp_path / "classes.json", {"classnames": ["Café", "Straße"]})
    assert target.read_bytes() == '{\n  "classnames": [\n    "Café",\n    "Straße"\n  ]\n}\n'.encode()


def test_tensors_of_either_old_writer_save_and_read_back(tmp_path):
    buffer = torch.arange(12.0).reshape(3, 4)
    weight = torch.nn.Parameter(torch.ones(2, 2))
    tensors = {
        "first_row": buffer[0],  # two views of one buffer: safetensors refuses shared storage
        "second_row": buffer[1],
        "columns": buffer.T,  # not contiguous
        "weight": weight,  # requires grad
    }
    atomic_save_tensors(tmp_path / "t.safetensors", tensors, {"identity": "aape-tiny@random-init", "skipped": [], "embed_dim": 64})
    saved = load_file(str(tmp_path / "t.safetensors"))
    assert {k: v.tolist() for k, v in saved.items()} == {k: v.tolist() for k, v in tensors.items()}
    assert read_metadata(tmp_path / "t.safetensors") == {"identity": "aape-tiny@random-init", "skipped": [], "embed_dim": 64}


def test_tensors_without_metadata_get_an_empty_header(tmp_path):
    atomic_save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:
        assert (fh.metadata() or {}) == {}
