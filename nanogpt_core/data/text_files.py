"""Documents from files on disk: parquet, JSON lines (optionally gzipped) and plain text.

The readers behind the `local` and `folder` text sources. A file that cannot be read,
decoded or parsed raises TextSourceError naming the file (and the line, for JSON lines).
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanogpt_core.data.documents import Document

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_BATCH_ROWS = 1024


class TextSourceError(RuntimeError):
    """A source that cannot yield documents; the message names the cause and the fix."""


def one_line(exc: BaseException) -> str:
    """An exception as one line, its type first: error messages quote it inside a sentence."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def local_files(path: Path) -> list[tuple[Path, str]]:
    """(file, name used in default ids) for every input file, in a stable order."""
    if path.is_file():
        if not path.name.endswith(LOCAL_SUFFIXES):
            raise TextSourceError(f"cannot read {path}: expected one of {', '.join(LOCAL_SUFFIXES)}")
        return [(path, path.name)]
    if path.is_dir():
        files = sorted(
            (p.relative_to(path).as_posix(), p) for p in path.rglob("*")
            if p.is_file() and p.name.endswith(LOCAL_SUFFIXES)
            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise TextSourceError(f"folder {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return [(p, name) for name, p in files]
    raise TextSourceError(f"local source {path} does not exist")


def iter_local_documents(path: str | Path) -> Iterator[Document]:
    """Documents from a parquet or JSON-lines file, or from every such file under a folder.

    Files in a folder are read in the order of their relative paths. A row's id is its `id`
    field when it has one, else `<file>:<row>` (row counted from 0), so ids stay the same
    wherever the files are copied. Rows without text are skipped: an empty document would
    add nothing but a separator token.
    """
    return documents_from_files(local_files(Path(path)))


def documents_from_files(files: list[tuple[Path, str]]) -> Iterator[Document]:
    """Documents from (file, name) pairs: a `.txt` file is one document with the name as its id;
    parquet and JSON-lines rows are documents with ids from their `id`, else `<name>:<row>`.

    A file that cannot be read or decoded raises TextSourceError naming it.
    """
    for file, name in files:
        try:
            if file.name.endswith(".txt"):
                text = file.read_text(encoding="utf-8")
                if text.strip():
                    yield Document(id=name, text=text)
                continue
            rows = _parquet_rows(file) if file.name.endswith(".parquet") else _jsonl_rows(file)
            for row_index, (doc_id, text, url) in enumerate(rows):
                if text:
                    yield Document(id=f"{name}:{row_index}" if doc_id is None else str(doc_id), text=text, url=url)
        except UnicodeDecodeError as e:
            raise TextSourceError(f"{file} is not UTF-8 text (byte {e.start}: {one_line(e)})") from e
        except OSError as e:
            raise TextSourceError(f"cannot read {file}: {one_line(e)}") from e


Row = tuple[Any, str | None, str | None]  # id, text, url


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow reports a damaged file with several exception types
        raise TextSourceError(f"cannot read {path} as parquet: {one_line(e)}") from e
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise TextSourceError(f"{path} has no 'text' column (columns: {', '.join(names)})")
    text_type = parquet.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise TextSourceError(f"{path}: the 'text' column holds {text_type}, not strings")
    columns = [c for c in ("id", "text", "url") if c in names]
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:  # a damaged page shows only when it is read
            raise TextSourceError(f"cannot read {path} as parquet: {one_line(e)}") from e
        data = {c: batch.column(c).to_pylist() for c in columns}
        ids = data.get("id") or itertools.repeat(None)
        urls = data.get("url") or itertools.repeat(None)
        yield from zip(ids, data["text"], urls)


def nonblank_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) for each line of a text file, gzipped when its name ends in .gz,
    blank lines passed over: the one reader of JSON-lines files, pretraining and instructions alike."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield line_number, line


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for line_number, line in nonblank_lines(path):
        try:
            record = json.loads(line)
            text = record["text"]
            if text is not None and not isinstance(text, str):
                raise TypeError(f"'text' is a {type(text).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TextSourceError(f"{path}:{line_number} is not a JSON object with a 'text' field "
                                  f"({one_line(e)})") from e
        yield record.get("id"), text, record.get("url")

