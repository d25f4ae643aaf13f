"""The `folder` text source: a folder of .txt, .jsonl and .parquet files, read in a fixed order,
versioned by a hash of its files' content."""

from __future__ import annotations

import json
import os
import shutil
import time
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanogpt_core.data.folder_source import FileHashCache, scan_folder
from nanogpt_core.data.raw import write_raw_parquet
from nanogpt_core.data.text_sources import TextSourceError, describe_source, iter_documents


def fill(folder):
    """One file of each format, one nested, plus files the source must pass over."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b_notes.txt").write_text("A plain text file is one document.\n", encoding="utf-8")
    (folder / "a_rows.jsonl").write_text(
        json.dumps({"id": "row-one", "text": "First JSON line."}) + "\n\n"
        + json.dumps({"text": "Second JSON line, no id."}) + "\n"
        + json.dumps({"text": ""}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["Parquet row zero.", None, "Parquet row two."],
                             "url": ["https://example.org/0", None, None]}), folder / "c_table.parquet")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "deeper.txt").write_text("Nested text counts too.", encoding="utf-8")
    (folder / ".half-copied.parquet").write_bytes(b"PAR1 not finished")  # dot names are left out
    (folder / ".staging").mkdir(exist_ok=True)
    (folder / ".staging" / "pending.txt").write_text("not yet", encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    return folder


def test_reads_all_three_formats_in_the_order_of_their_relative_paths(tmp_path):
    docs = list(iter_documents("folder", path=fill(tmp_path / "incoming")))
    assert [(d.id, d.text) for d in docs] == [
        ("row-one", "First JSON line."),
        ("a_rows.jsonl:1", "Second JSON line, no id."),  # the blank line is not a row
        ("b_notes.txt", "A plain text file is one document.\n"),
        ("c_table.parquet:0", "Parquet row zero."),
        ("c_table.parquet:2", "Parquet row two."),
        ("sub/deeper.txt", "Nested text counts too."),
    ]
    assert docs[3].url == "https://example.org/0"


def test_the_content_hash_depends_on_names_and_bytes_only(tmp_path):
    first = scan_folder(fill(tmp_path / "one"))
    copy = tmp_path / "two"
    shutil.copytree(tmp_path / "one", copy)  # another place, other modification times
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    assert scan_folder(copy).content_hash == first.content_hash
    assert scan_folder(copy).files == first.files == (
        "a_rows.jsonl", "b_notes.txt", "c_table.parquet", "empty.txt", "sub/deeper.txt")

    (copy / ".another-partial.txt").write_text("still copying", encoding="utf-8")
    assert scan_folder(copy).content_hash == first.content_hash  # hidden files do not count

    (copy / "b_notes.txt").write_text("A plain text file is one document!\n", encoding="utf-8")
    edited = scan_folder(copy).content_hash
    assert edited != first.content_hash
    (copy / "b_notes.txt").rename(copy / "b_renamed.txt")
    assert scan_folder(copy).content_hash not in (first.content_hash, edited)
    (copy / "b_renamed.txt").rename(copy / "b_notes.txt")
    assert scan_folder(copy).content_hash == edited
    (copy / "new.txt").write_text("New text arrives.", encoding="utf-8")
    assert scan_folder(copy).content_hash != edited


def test_the_description_records_the_folder_files_and_hash(tmp_path):
    folder = fill(tmp_path / "incoming")
    description = describe_source("folder", path=folder)
    snapshot = scan_folder(folder)
    assert description["source"] == "folder"
    assert description["folder"] == str(folder.resolve())
    assert description["files"] == list(snapshot.files)
    assert description["content_hash"] == snapshot.content_hash
    stats = write_raw_parquet(snapshot.documents(), tmp_path / "raw.parquet", source=snapshot.describe())
    assert stats.documents == 6 and stats.source["content_hash"] == snapshot.content_hash


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"caf\xe9 latin-1", r"bad\.txt is not UTF-8 text \(byte 3"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": 3}\n', r"bad\.jsonl:2 is not a JSON object with a 'text' field"),
    ("bad.jsonl", b"\xff\xfe{}\n", r"bad\.jsonl is not UTF-8 text"),
    ("bad.parquet", b"PAR1 this is not parquet PAR1", r"cannot read .*bad\.parquet as parquet"),
])
def test_an_unreadable_file_is_named_in_the_error(tmp_path, name, content, message):
    folder = fill(tmp_path / "incoming")
    (folder / name).write_bytes(content)
    with pytest.raises(TextSourceError, match=message):
        list(iter_documents("folder", path=folder))


def test_a_parquet_file_whose_text_is_not_strings_is_named(tmp_path):
    folder = fill(tmp_path / "incoming")
    pq.write_table(pa.table({"text": [1, 2]}), folder / "numbers.parquet")
    with pytest.raises(TextSourceError, match=r"numbers\.parquet: the 'text' column holds int64"):
        list(iter_documents("folder", path=folder))


def test_a_broken_link_fails_the_scan_naming_it(tmp_path):
    folder = fill(tmp_path / "incoming")
    (folder / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(TextSourceError, match=r"cannot read .*gone\.txt: No such file"):
        scan_folder(folder)


def test_a_file_of_another_kind_is_refused_by_name_rather_than_skipped(tmp_path):
    folder = fill(tmp_path / "incoming")
    (folder / "report.pdf").write_bytes(b"%PDF-1.7")
    with pytest.raises(TextSourceError, match=r"not text this source reads: report\.pdf; convert them"):
        scan_folder(folder)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, r"text folder .*incoming does not exist"),
    (lambda p: p.write_text("x"), r"text folder .*incoming is not a folder"),
    (lambda p: (p.mkdir(), (p / ".hidden.txt").write_text("x")), r"holds no \.txt, \.jsonl, \.parquet files"),
])
def test_a_missing_or_empty_folder_is_a_clear_error(tmp_path, setup, message):
    setup(tmp_path / "incoming")
    with pytest.raises(TextSourceError, match=message):
        scan_folder(tmp_path / "incoming")


def test_the_folder_source_needs_a_path():
    with pytest.raises(TextSourceError, match="the folder source needs a path"):
        iter_documents("folder")


def test_text_that_changes_while_it_is_read_fails_the_read(tmp_path):
    folder = fill(tmp_path / "incoming")
    documents = scan_folder(folder).documents()
    next(documents)
    (folder / "z_late.txt").write_text("Arrived mid-read.", encoding="utf-8")
    with pytest.raises(TextSourceError, match=r"changed while it was read \(added: z_late\.txt\)"):
        list(documents)


def test_a_hash_cache_reads_only_the_files_that_changed_and_gives_the_same_hash(tmp_path):
    folder = fill(tmp_path / "incoming")
    settled = 1_000_000_000  # times well before now: the files count as settled
    for path in folder.rglob("*"):
        os.utime(path, (settled, settled))
    time.sleep(0.05)  # let the status-change times fall behind the clock
    cache = FileHashCache()
    with mock.patch("nanogpt_core.data.folder_source.RACY_MARGIN_NS", 0):
        first = scan_folder(folder, cache)
        assert cache.files_read == 5 and first.content_hash == scan_folder(folder).content_hash
        time.sleep(0.05)
        assert scan_folder(folder, cache).content_hash == first.content_hash
        assert cache.files_read == 5  # nothing was read again

        # Same size, modification time set back: the status-change time still gives it away.
        (folder / "b_notes.txt").write_text("A plain text file is one document!\n", encoding="utf-8")
        os.utime(folder / "b_notes.txt", (settled, settled))
        edited = scan_folder(folder, cache)
        assert cache.files_read == 6
        assert edited.content_hash == scan_folder(folder).content_hash != first.content_hash

        (folder / "sub" / "deeper.txt").unlink()
        assert scan_folder(folder, cache).content_hash == scan_folder(folder).content_hash
        assert cache.files_read == 6


def test_a_hash_cache_does_not_trust_a_file_changed_just_before_it_was_hashed(tmp_path):
    folder = fill(tmp_path / "incoming")
    cache = FileHashCache()
    scan_folder(folder, cache)
    scan_folder(folder, cache)  # written moments ago: within the margin, so read again
    assert cache.files_read == 10
