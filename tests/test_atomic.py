"""Atomic writes: a failed write leaves the previous file intact and no temporary file behind; the
file gets the mode the umask asks for, not the temporary file's private 0o600."""

import json
import os
import stat

import pytest

from aape.atomic import atomic_write, atomic_write_json, atomic_write_stream, atomic_write_text


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
