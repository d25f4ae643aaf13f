"""Atomic file replacement: a reader sees the old file or the new one, and a failed write leaves no trace."""

from __future__ import annotations

import stat

import pytest

from nanogpt_core.atomic_file import PendingFile, replacing, write_bytes_atomically, write_text_atomically


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_replaces_the_whole_file_readable_by_others(tmp_path):
    path = tmp_path / "sub" / "file.json"
    write_text_atomically(path, "old")
    assert write_bytes_atomically(path, b"new") == path
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert leftovers(path.parent) == []


def test_a_failure_inside_the_block_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(path) as f:
            f.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_check_that_refuses_the_finished_file_keeps_it_from_the_real_name(tmp_path):
    path = tmp_path / "download.jsonl"
    seen = []

    def refuse(tmp):
        seen.append(tmp.read_bytes())
        raise ValueError("not what it claims")

    with pytest.raises(ValueError, match="not what it claims"):
        with replacing(path, check=refuse) as f:
            f.write(b"<html>")
    assert seen == [b"<html>"]  # the check read the whole, flushed content
    assert not path.exists() and leftovers(tmp_path) == []


def test_a_pending_file_takes_its_name_on_commit_and_vanishes_on_discard(tmp_path):
    kept, dropped = PendingFile(tmp_path / "a.bin"), PendingFile(tmp_path / "b.bin")
    for pending in (kept, dropped):
        pending.file.write(b"tokens")
        assert pending.tmp.name.startswith(f".{pending.path.name}.") and pending.tmp.name.endswith(".tmp")
    kept.commit()
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
