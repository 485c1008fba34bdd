"""Atomic writes: a failed write leaves the previous file intact and no temporary file behind."""

import json

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
