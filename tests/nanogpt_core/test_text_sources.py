"""Pretraining text: three sources behind one call, raw parquet with a content hash, the CLI."""

import gzip
import itertools
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanogpt_core.data import raw
from nanogpt_core.data.demo_corpus import iter_demo_documents
from nanogpt_core.data.documents import Document
from nanogpt_core.data.raw import (RawDataError, iter_raw_documents, iter_raw_texts, read_raw_stats, stats_path,
                                   write_raw_parquet)
from nanogpt_core.data.text_sources import (SourceUnavailableError, TextSourceError, describe_source,
                                            iter_documents)

DOCS = [Document(id=f"doc-{i}", text=f"Document {i} says something about topic {i % 5}. " * (1 + i % 4),
                 url=f"https://example.org/{i}" if i % 2 else None) for i in range(40)]


# --- local files ---------------------------------------------------------------------------

def test_local_reads_the_fineweb_sample_with_its_ids_and_urls(shared_data):
    docs = list(iter_documents("local", path=shared_data / "fineweb" / "fineweb_sample_2800.parquet"))
    assert len(docs) == 2800
    assert 19_000_000 < sum(len(d.text) for d in docs) < 19_600_000
    assert all(d.id.startswith("<urn:uuid:") for d in docs)
    assert len({d.id for d in docs}) == 2800
    assert all(d.url and d.url.startswith("http") for d in docs)


def test_local_reads_a_folder_holding_the_fineweb_edu_sample(shared_data):
    docs = list(iter_documents("local", path=shared_data / "fineweb_edu"))
    assert len(docs) == 155
    assert sum(d.id.startswith("<urn:uuid:") for d in docs) == 5  # the rest are content-hash ids
    assert all(d.url is None and d.text.strip() for d in docs)  # this sample has no url column


def test_local_reads_json_lines_with_ids_from_the_file_or_from_the_row(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(
        json.dumps({"id": "first", "text": "Alpha text.", "url": "https://a.example"}) + "\n"
        + "\n"  # blank lines are allowed
        + json.dumps({"text": "Beta text, no id."}) + "\n"
        + json.dumps({"id": "empty", "text": ""}) + "\n"  # no text: skipped, but still counts as a row
        + json.dumps({"text": "Gamma text."}) + "\n")
    with gzip.open(folder / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "Delta, gzipped."}) + "\n")
    (folder / "notes.txt").write_text("not a data file: ignored inside a folder")
    docs = list(iter_documents("local", path=folder))
    assert [(d.id, d.text, d.url) for d in docs] == [
        ("first", "Alpha text.", "https://a.example"),
        ("a.jsonl:1", "Beta text, no id.", None),
        ("a.jsonl:3", "Gamma text.", None),
        ("sub/b.jsonl.gz:0", "Delta, gzipped.", None),
    ]


def test_limit_stops_after_that_many_documents(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [d.text for d in DOCS]}), path)
    docs = list(iter_documents("local", path=path, limit=3))
    assert [d.id for d in docs] == ["docs.parquet:0", "docs.parquet:1", "docs.parquet:2"]
    assert list(iter_documents("demo", limit=2)) == list(itertools.islice(iter_demo_documents(), 2))


def test_a_bad_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(TextSourceError, match=r"bad.jsonl:2 is not a JSON object with a 'text' field"):
        list(iter_documents("local", path=path))


def test_a_parquet_file_without_text_lists_its_columns(tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": ["x"], "content": ["y"]}), path)
    with pytest.raises(TextSourceError, match=r"wrong.parquet has no 'text' column \(columns: id, content\)"):
        list(iter_documents("local", path=path))


@pytest.mark.parametrize("call, message", [
    (lambda: iter_documents("common-crawl"), r"unknown text source 'common-crawl'; choose one of: "
                                             r"fineweb-edu, local, demo"),
    (lambda: iter_documents("local"), r"the local source needs a path"),
    (lambda: iter_documents("local", path="/no/such/place"), r"local source /no/such/place does not exist"),
    (lambda: iter_documents("demo", limit=-1), r"limit must be a number of documents"),
])
def test_bad_arguments_fail_at_the_call_with_a_clear_message(call, message):
    with pytest.raises(TextSourceError, match=message):
        call()


def test_the_source_description_names_what_was_read(shared_data):
    sample = shared_data / "fineweb_edu" / "fineweb_edu_sample_155.parquet"
    assert describe_source("local", path=sample.parent, limit=10) == {
        "source": "local", "limit": 10, "files": [str(sample.resolve())]}
    assert describe_source("fineweb-edu")["name"] == "sample-10BT"


# --- fineweb-edu ---------------------------------------------------------------------------

def test_fineweb_edu_streams_from_the_hub_or_fails_fast_with_one_clear_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # exercise the real connection attempt
    pytest.importorskip("datasets", reason="the fineweb-edu source needs the `datasets` package")
    start = time.monotonic()
    try:
        docs = list(iter_documents("fineweb-edu", limit=2))
    except SourceUnavailableError as e:
        message = str(e)
        assert time.monotonic() - start < 10, "an unreachable hub must not cost minutes of retries"
        assert "\n" not in message
        assert "could not reach the Hugging Face Hub" in message
        assert "--source local" in message and "--source demo" in message
    else:  # a machine that reaches the hub
        assert len(docs) == 2 and all(d.id and d.text for d in docs)


# --- raw parquet ---------------------------------------------------------------------------

def test_raw_parquet_round_trips_documents_and_records_their_stats(tmp_path):
    path = tmp_path / "raw" / "documents.parquet"
    stats = write_raw_parquet(DOCS, path, source={"source": "test"})
    assert list(iter_raw_documents(path)) == DOCS
    assert list(iter_raw_texts(path)) == [d.text for d in DOCS]
    assert stats.documents == 40
    assert stats.characters == sum(len(d.text) for d in DOCS)
    assert stats.bytes == sum(len(d.text.encode()) for d in DOCS)
    assert stats.file_bytes == path.stat().st_size
    assert stats.source == {"source": "test"}
    assert read_raw_stats(path) == stats
    assert json.loads(stats_path(path).read_text())["content_hash"] == stats.content_hash
    assert pq.ParquetFile(path).schema_arrow.names == ["id", "text", "url"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["documents.parquet", "documents.stats.json"]


def test_the_content_hash_is_a_data_version_of_ids_and_texts(tmp_path):
    first = write_raw_parquet(DOCS, tmp_path / "a.parquet").content_hash
    assert write_raw_parquet(DOCS, tmp_path / "b.parquet").content_hash == first
    edited = DOCS[:7] + [Document(id=DOCS[7].id, text=DOCS[7].text + "!")] + DOCS[8:]
    assert write_raw_parquet(edited, tmp_path / "c.parquet").content_hash != first
    renamed = DOCS[:7] + [Document(id="other", text=DOCS[7].text)] + DOCS[8:]
    assert write_raw_parquet(renamed, tmp_path / "d.parquet").content_hash != first
    # length framing: moving text across a document boundary is a different corpus
    moved = [Document("x", "ab"), Document("y", "c")], [Document("x", "a"), Document("y", "bc")]
    assert raw.content_hash(moved[0]) != raw.content_hash(moved[1])
    # URLs are not read downstream, so they do not change the version
    no_urls = [Document(id=d.id, text=d.text) for d in DOCS]
    assert write_raw_parquet(no_urls, tmp_path / "e.parquet").content_hash == first


def test_raw_parquet_is_written_in_row_groups_as_documents_arrive(tmp_path, monkeypatch):
    monkeypatch.setattr(raw, "ROW_GROUP_DOCUMENTS", 16)
    path = tmp_path / "documents.parquet"
    write_raw_parquet(iter(DOCS), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3  # 16 + 16 + 8


def test_an_interrupted_write_leaves_no_file_that_looks_finished(tmp_path):
    path = tmp_path / "documents.parquet"
    write_raw_parquet(DOCS, path)

    def failing():
        yield from DOCS[:5]
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        write_raw_parquet(failing(), path)
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file of the failed write is gone
    with pytest.raises(RawDataError, match="has no documents.stats.json: it is unfinished"):
        read_raw_stats(path)


# --- the command line ------------------------------------------------------------------------

def test_prepare_writes_raw_parquet_and_shards_built_from_it(shared_data, tmp_path, capsys):
    from nanogpt_core.data.prepare import main
    from nanogpt_core.shards import ShardManifest

    main(["--source", "local", "--path", str(shared_data / "fineweb_edu"), "--limit", "60",
          "--raw-out", str(tmp_path / "raw.parquet"), "--shards-out", str(tmp_path / "shards"),
          "--val-fraction", "0.1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["raw"]["documents"] == 60
    assert summary["shards"]["documents"] == {"train": 54, "val": 6}
    manifest = ShardManifest.load(tmp_path / "shards")
    assert manifest.data_version == summary["shards"]["data_version"]
    assert manifest.source["raw_content_hash"] == summary["raw"]["content_hash"]


def test_prepare_reports_an_unreachable_hub_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # exercise the real connection attempt
    pytest.importorskip("datasets", reason="the fineweb-edu source needs the `datasets` package")
    from nanogpt_core.data.prepare import main

    try:
        main(["--source", "fineweb-edu", "--limit", "1", "--shards-out", str(tmp_path / "shards")])
    except SystemExit as e:
        assert str(e.code).startswith("error: could not reach the Hugging Face Hub")
        assert "\n" not in str(e.code)
    else:
        pytest.skip("this machine reaches the Hugging Face Hub")
