"""Pretraining text sources behind one call: `iter_documents(source, path=..., limit=...)`.

    fineweb-edu   HuggingFaceFW/fineweb-edu, sample-10BT, streamed from the Hugging Face Hub
    local         parquet or JSON-lines files (or folders of them) with a `text` column,
                  the FineWeb schema: `id` and `url` are used when present
    demo          CPython's own documentation, offline (see demo_corpus)
    folder        a folder people drop .txt, .jsonl and .parquet files into, with a content
                  hash of its files (see folder_source)

Each yields `Document`s in a fixed order, so the same source and arguments give the same
documents and, downstream, the same content hash.
"""

from __future__ import annotations

import gzip
import itertools
import json
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nanogpt_core.data.documents import Document

SOURCES = ("fineweb-edu", "local", "demo", "folder")
PATH_SOURCES = ("local", "folder")  # the sources that read files, and so need a path

FINEWEB_EDU_DATASET = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_CONFIG = "sample-10BT"
FINEWEB_EDU_SPLIT = "train"
# Without this probe an unreachable hub costs about 25 s of retries inside huggingface_hub
# (five attempts with exponential back-off) before `load_dataset` gives up.
HUB_PROBE_TIMEOUT_S = 5.0

LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_BATCH_ROWS = 1024


class TextSourceError(RuntimeError):
    """A source that cannot yield documents; the message names the cause and the fix."""


class SourceUnavailableError(TextSourceError):
    """A remote source that cannot be reached from this machine."""


def iter_documents(source: str, *, path: str | Path | None = None, limit: int | None = None) -> Iterator[Document]:
    """Documents from `source`, at most `limit` of them.

    Arguments are checked, and a remote source is probed, when this is called rather than
    on the first `next()`, so a bad call fails where it is made.
    """
    _check_arguments(source, path, limit)
    if source == "fineweb-edu":
        documents = _fineweb_edu_documents()
    elif source == "local":
        documents = iter_local_documents(path)  # type: ignore[arg-type]
    elif source == "folder":
        from nanogpt_core.data.folder_source import scan_folder

        documents = scan_folder(path).documents()  # type: ignore[arg-type]
    else:
        from nanogpt_core.data.demo_corpus import iter_demo_documents

        documents = iter_demo_documents()
    return documents if limit is None else itertools.islice(documents, limit)


def describe_source(source: str, *, path: str | Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """What `iter_documents` with these arguments reads, for the record kept beside its output."""
    _check_arguments(source, path, limit)
    description: dict[str, Any] = {"source": source, "limit": limit}
    if source == "fineweb-edu":
        description.update(dataset=FINEWEB_EDU_DATASET, name=FINEWEB_EDU_CONFIG, split=FINEWEB_EDU_SPLIT)
    elif source == "local":
        description["files"] = [str(file.resolve()) for file, _ in _local_files(Path(path))]  # type: ignore[arg-type]
    elif source == "folder":
        from nanogpt_core.data.folder_source import scan_folder

        description.update(scan_folder(path).describe())  # type: ignore[arg-type]
    else:
        description["python"] = sys.version.split()[0]
    return description


def _check_arguments(source: str, path: str | Path | None, limit: int | None) -> None:
    if source not in SOURCES:
        raise TextSourceError(f"unknown text source {source!r}; choose one of: {', '.join(SOURCES)}")
    if limit is not None and limit < 0:
        raise TextSourceError(f"limit must be a number of documents (0 or more), got {limit}")
    if source == "local" and path is None:
        raise TextSourceError("the local source needs a path: a parquet or JSON-lines file, or a folder of them")
    if source == "folder" and path is None:
        raise TextSourceError("the folder source needs a path: a folder of .txt, .jsonl or .parquet files")
    if source not in PATH_SOURCES and path is not None:
        raise TextSourceError(f"the {source} source takes no path (only {' and '.join(PATH_SOURCES)} read files)")


# ---------------------------------------------------------------------------------------------
# fineweb-edu


def _fineweb_edu_documents() -> Iterator[Document]:
    try:
        import datasets
        from huggingface_hub import constants as hub
    except ImportError as e:
        raise TextSourceError(f"the fineweb-edu source needs the `datasets` package ({e}); "
                              f"install it, or use --source local or --source demo") from e
    if hub.HF_HUB_OFFLINE:
        raise SourceUnavailableError(
            f"{FINEWEB_EDU_DATASET} is streamed from the Hugging Face Hub, and HF_HUB_OFFLINE is set; "
            f"use --source local --path FILES (parquet or JSON lines with a `text` column) or --source demo")
    reason = _unreachable_reason(hub.ENDPOINT)
    if reason is not None:
        raise _hub_unreachable(hub.ENDPOINT, reason)
    try:
        dataset = datasets.load_dataset(FINEWEB_EDU_DATASET, name=FINEWEB_EDU_CONFIG, split=FINEWEB_EDU_SPLIT,
                                        streaming=True)
    except (ConnectionError, OSError, TimeoutError) as e:
        raise _hub_unreachable(hub.ENDPOINT, _one_line(e)) from e
    return _stream_rows(iter(dataset), hub.ENDPOINT)


def _stream_rows(rows: Iterator[dict[str, Any]], endpoint: str) -> Iterator[Document]:
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (ConnectionError, OSError, TimeoutError) as e:
            raise _hub_unreachable(endpoint, _one_line(e)) from e
        yield Document(id=str(row["id"]), text=row["text"], url=row.get("url"))


def _unreachable_reason(endpoint: str) -> str | None:
    """Why a TCP connection to the hub (or the proxy in front of it) fails, or None if it opens.

    The attempt runs in a daemon thread because a DNS lookup takes no timeout: a resolver
    that never answers is abandoned after HUB_PROBE_TIMEOUT_S rather than waited for.
    """
    url = urlsplit(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or "", proxy_url.port or 80
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"cannot connect to {host}:{port}: {_one_line(e)}")

    probe = threading.Thread(target=connect, name="hub-probe", daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {HUB_PROBE_TIMEOUT_S:g} s"


def _hub_unreachable(endpoint: str, reason: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"could not reach the Hugging Face Hub at {endpoint} to stream {FINEWEB_EDU_DATASET} ({reason}); "
        f"use --source local --path FILES (parquet or JSON lines with a `text` column) or --source demo")


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# local files


def _local_files(path: Path) -> list[tuple[Path, str]]:
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
    return documents_from_files(_local_files(Path(path)))


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
            raise TextSourceError(f"{file} is not UTF-8 text (byte {e.start}: {_one_line(e)})") from e
        except OSError as e:
            raise TextSourceError(f"cannot read {file}: {_one_line(e)}") from e


Row = tuple[Any, str | None, str | None]  # id, text, url


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow reports a damaged file with several exception types
        raise TextSourceError(f"cannot read {path} as parquet: {_one_line(e)}") from e
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
            raise TextSourceError(f"cannot read {path} as parquet: {_one_line(e)}") from e
        data = {c: batch.column(c).to_pylist() for c in columns}
        ids = data.get("id") or itertools.repeat(None)
        urls = data.get("url") or itertools.repeat(None)
        yield from zip(ids, data["text"], urls)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
                if text is not None and not isinstance(text, str):
                    raise TypeError(f"'text' is a {type(text).__name__}")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TextSourceError(f"{path}:{line_number} is not a JSON object with a 'text' field "
                                      f"({_one_line(e)})") from e
            yield record.get("id"), text, record.get("url")

