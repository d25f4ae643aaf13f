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

import itertools
import socket
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nanogpt_core.data.documents import Document
from nanogpt_core.data.folder_source import scan_folder
from nanogpt_core.data.text_files import (TextSourceError, iter_local_documents, local_files,
                                          one_line)

# TextSourceError is what iter_documents raises, so callers catch it from here.
__all__ = ["SOURCES", "PATH_SOURCES", "TextSourceError", "SourceUnavailableError", "iter_documents",
           "describe_source"]

SOURCES = ("fineweb-edu", "local", "demo", "folder")
PATH_SOURCES = ("local", "folder")  # the sources that read files, and so need a path

FINEWEB_EDU_DATASET = "HuggingFaceFW/fineweb-edu"
FINEWEB_EDU_CONFIG = "sample-10BT"
FINEWEB_EDU_SPLIT = "train"
# Without this probe an unreachable hub costs about 25 s of retries inside huggingface_hub
# (five attempts with exponential back-off) before `load_dataset` gives up.
HUB_PROBE_TIMEOUT_S = 5.0


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
        description["files"] = [str(file.resolve()) for file, _ in local_files(Path(path))]  # type: ignore[arg-type]
    elif source == "folder":
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
        raise _hub_unreachable(hub.ENDPOINT, one_line(e)) from e
    return _stream_rows(iter(dataset), hub.ENDPOINT)


def _stream_rows(rows: Iterator[dict[str, Any]], endpoint: str) -> Iterator[Document]:
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (ConnectionError, OSError, TimeoutError) as e:
            raise _hub_unreachable(endpoint, one_line(e)) from e
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
            outcome.append(f"cannot connect to {host}:{port}: {one_line(e)}")

    probe = threading.Thread(target=connect, name="hub-probe", daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {HUB_PROBE_TIMEOUT_S:g} s"


def _hub_unreachable(endpoint: str, reason: str) -> SourceUnavailableError:
    return SourceUnavailableError(
        f"could not reach the Hugging Face Hub at {endpoint} to stream {FINEWEB_EDU_DATASET} ({reason}); "
        f"use --source local --path FILES (parquet or JSON lines with a `text` column) or --source demo")
