"""Atomic writes: complete or untouched, with the permissions a plain write would give."""

import os
import stat

import pytest

from clipdense.fileio import atomic_write, atomic_write_json


def test_atomic_write_gives_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "b.json").read_text() == '{"x": 1}\n'
    assert stat.S_IMODE((tmp_path / "a" / "b.json").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]
