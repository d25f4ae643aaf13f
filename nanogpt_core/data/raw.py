"""Raw documents on disk: one parquet file (columns id, text, url) and its stats beside it.

The stats' `content_hash` is a sha256 over the documents' ids and texts in order, framed by
length so that no two different corpora collide by concatenation. It is the raw data's
version: the same documents always give the same hash, whatever the source or machine.
URLs are left out of it because nothing downstream reads them, so a corrected URL should
not make the token shards look stale.

The parquet file is written in row groups as documents arrive, so memory stays bounded by
one row group whatever the corpus size, and it appears under its name only when complete.
The stats file (`<name>.stats.json`) is written after it and marks the pair as finished.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nanogpt_core.atomic_file import PendingFile, write_text_atomically
from nanogpt_core.data.documents import Document

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("url", pa.string())])
# A row group is flushed at whichever limit comes first; these bound the writer's memory.
ROW_GROUP_DOCUMENTS = 8192
ROW_GROUP_CHARACTERS = 32 * 2**20
READ_BATCH_ROWS = 1024


class RawDataError(RuntimeError):
    """A raw document file that is missing, unfinished or unreadable, named in the message."""


@dataclass(frozen=True)
class RawStats:
    documents: int
    characters: int
    bytes: int  # UTF-8 bytes of all texts
    file_bytes: int  # size of the parquet file
    content_hash: str  # sha256 hex over ids and texts, in order
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stats_path(parquet_path: str | Path) -> Path:
    parquet_path = Path(parquet_path)
    return parquet_path.with_name(parquet_path.stem + ".stats.json")


class _ContentHash:
    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, doc_id: bytes, text: bytes) -> None:
        self._sha.update(len(doc_id).to_bytes(8, "little"))
        self._sha.update(doc_id)
        self._sha.update(len(text).to_bytes(8, "little"))
        self._sha.update(text)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def content_hash(documents: Iterable[Document]) -> str:
    """The content hash `write_raw_parquet` would record for these documents."""
    digest = _ContentHash()
    for doc in documents:
        digest.add(doc.id.encode("utf-8"), doc.text.encode("utf-8"))
    return digest.hexdigest()


def write_raw_parquet(documents: Iterable[Document], path: str | Path, *,
                        source: dict[str, Any] | None = None) -> RawStats:
    """Write documents to a parquet file and its stats file; return the stats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats_file = stats_path(path)
    stats_file.unlink(missing_ok=True)  # the pair is unfinished until the stats are rewritten
    pending = PendingFile(path)
    digest = _ContentHash()
    n_documents = n_characters = n_bytes = 0
    try:
        with pq.ParquetWriter(pending.file, SCHEMA, compression="zstd") as writer:
            ids: list[str] = []
            texts: list[str] = []
            urls: list[str | None] = []
            group_characters = 0
            for doc in documents:
                encoded = doc.text.encode("utf-8")
                digest.add(doc.id.encode("utf-8"), encoded)
                n_documents += 1
                n_characters += len(doc.text)
                n_bytes += len(encoded)
                ids.append(doc.id)
                texts.append(doc.text)
                urls.append(doc.url)
                group_characters += len(doc.text)
                if len(ids) >= ROW_GROUP_DOCUMENTS or group_characters >= ROW_GROUP_CHARACTERS:
                    writer.write_table(pa.table([ids, texts, urls], schema=SCHEMA))
                    ids, texts, urls, group_characters = [], [], [], 0
            if ids:
                writer.write_table(pa.table([ids, texts, urls], schema=SCHEMA))
    except BaseException:
        pending.discard()
        raise
    pending.commit()
    stats = RawStats(documents=n_documents, characters=n_characters, bytes=n_bytes,
                     file_bytes=path.stat().st_size, content_hash=digest.hexdigest(), source=source or {})
    write_text_atomically(stats_file, json.dumps(stats.to_dict(), indent=2) + "\n")
    return stats


def read_raw_stats(path: str | Path) -> RawStats:
    """The stats recorded for a finished raw document file."""
    path = Path(path)
    stats_file = stats_path(path)
    if not path.is_file():
        raise RawDataError(f"raw document file {path} does not exist")
    if not stats_file.is_file():
        raise RawDataError(f"{path} has no {stats_file.name}: it is unfinished (an interrupted write "
                           f"leaves none) or was not written by write_raw_parquet; write it again")
    try:
        stats = RawStats(**json.loads(stats_file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise RawDataError(f"{stats_file} is not a valid stats file: {e}") from e
    if stats.file_bytes != path.stat().st_size:
        raise RawDataError(f"{stats_file} describes a {stats.file_bytes}-byte file but {path} has "
                           f"{path.stat().st_size} bytes: the parquet file changed after its stats were written")
    return stats


def iter_raw_texts(path: str | Path) -> Iterator[str]:
    """The text of every document in a parquet file with a `text` column, in order.

    Reads one batch of rows at a time, so memory stays flat however large the file is.
    """
    for batch in _batches(Path(path), ["text"]):
        texts = batch.column(0)
        if texts.null_count:
            texts = texts.drop_null()
        yield from texts.to_pylist()


def iter_raw_documents(path: str | Path) -> Iterator[Document]:
    for batch in _batches(Path(path), ["id", "text", "url"]):
        columns = [batch.column(name).to_pylist() for name in ("id", "text", "url")]
        for doc_id, text, url in zip(*columns):
            yield Document(id=doc_id, text=text, url=url)


def _batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if not path.is_file():
        raise RawDataError(f"raw document file {path} does not exist")
    parquet = pq.ParquetFile(path)
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise RawDataError(f"{path} lacks column(s) {', '.join(missing)} "
                           f"(it has: {', '.join(parquet.schema_arrow.names)})")
    yield from parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns)

