"""A folder people drop pretraining text into: the `folder` text source.

Every `.txt` (one document per file), `.jsonl` (one document per line, a `text` field) and
`.parquet` (one document per row, a `text` column) file under the folder is part of the
corpus, read in the order of the files' relative paths. Names starting with a dot, at any
depth, are passed over: copying a file in under a dot name and renaming it when complete
keeps a half-copied file from being read. Any other file is an error that names it, since
silently skipping text someone dropped in would hide their mistake.

The folder's content hash is a sha256 over each file's relative path and bytes, in order:
the same files with the same bytes give the same hash on any machine, whatever their
modification times; a renamed, added, removed or edited file changes it. It is what a
watcher compares to notice new text, and what the records of a read name as its version.

A watcher that scans every few seconds need not read every byte each time: given a
`FileHashCache`, a file whose device, inode, size, modification and status-change times are
all as they were when it was last hashed is not read again. The status-change time moves on
every write and cannot be set back by a program, so an edit that restores the modification
time is still seen. File times are coarse (a few milliseconds), so a file changed shortly
before it was hashed could be changed again without its times moving: such a file is trusted
only once its status-change time is a safe margin older than its hash (git's "racily clean"
entries, handled the same way). The hash is the same either way; the cache only skips work.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanogpt_core.data.documents import Document
from nanogpt_core.data.text_files import TextSourceError, documents_from_files

FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
READ_CHUNK_BYTES = 1 << 20
RACY_MARGIN_NS = 2_000_000_000  # a cached hash counts only for files unchanged this long before it


@dataclass(frozen=True)
class FolderSnapshot:
    """What a folder held when it was scanned: its text files in reading order, and their hash."""

    folder: Path
    files: tuple[str, ...]  # relative POSIX paths, sorted
    content_hash: str
    bytes: int

    def documents(self) -> Iterator[Document]:
        """The documents of the scanned files; fails at the end if the folder changed meanwhile.

        Reading a file that is being replaced could mix old and new text under one version, so
        the folder is hashed again after the last document and must match this snapshot.
        """
        yield from documents_from_files([(self.folder / name, name) for name in self.files])
        now = scan_folder(self.folder)
        if now.content_hash != self.content_hash:
            added = sorted(set(now.files) - set(self.files))
            removed = sorted(set(self.files) - set(now.files))
            parts = ([f"added: {', '.join(added)}"] if added else []) + \
                ([f"removed: {', '.join(removed)}"] if removed else [])
            detail = "; ".join(parts) or "a file's content changed"
            raise TextSourceError(
                f"{self.folder} changed while it was read ({detail}); read it again once it is settled "
                f"(copy files in under a name starting with '.', then rename them)")

    def describe(self) -> dict[str, Any]:
        return {"source": "folder", "folder": str(self.folder), "files": list(self.files),
                "content_hash": self.content_hash, "bytes": self.bytes}


class FileHashCache:
    """Each file's hash, kept for as long as its stat signature (see the module doc) is unchanged.

    Safe to share between threads; it holds one entry per file of the latest scan of a folder.
    """

    def __init__(self) -> None:
        # path -> (stat signature, sha256 of the bytes, size, when it was hashed in ns)
        self._entries: dict[str, tuple[tuple[int, ...], bytes, int, int]] = {}
        self._lock = threading.Lock()
        self.files_read = 0  # how many files were read in full, for the curious and for tests

    def hash_file(self, path: Path) -> tuple[bytes, int]:
        try:
            stat = path.stat()
        except OSError as e:
            raise TextSourceError(f"cannot read {path}: {e.strerror or e}") from e
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        key = os.fspath(path)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0] == signature and stat.st_ctime_ns < entry[3] - RACY_MARGIN_NS:
            return entry[1], entry[2]
        hashed_at = time.time_ns()
        digest, size = _hash_file(path)
        with self._lock:
            self._entries[key] = (signature, digest, size, hashed_at)
            self.files_read += 1
        return digest, size

    def keep_only(self, paths: set[str]) -> None:
        """Forget files that are gone, so that the cache does not grow with every name ever seen."""
        with self._lock:
            for key in set(self._entries) - paths:
                del self._entries[key]


def scan_folder(folder: str | Path, cache: FileHashCache | None = None) -> FolderSnapshot:
    """List and hash the folder's text files; raise TextSourceError naming any file at fault.

    With a `cache`, files unchanged since it last hashed them are not read again."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise TextSourceError(f"text folder {folder} {reason}; create it and put "
                              f"{', '.join(FOLDER_SUFFIXES)} files in it")
    names = sorted(path.relative_to(folder).as_posix() for path in _visible_files(folder))
    unsupported = [name for name in names if not name.endswith(FOLDER_SUFFIXES)]
    if unsupported:
        raise TextSourceError(
            f"{folder} holds files that are not text this source reads: {', '.join(unsupported)}; "
            f"convert them to {', '.join(FOLDER_SUFFIXES)}, or rename them to start with '.' to leave them out")
    if not names:
        raise TextSourceError(f"text folder {folder} holds no {', '.join(FOLDER_SUFFIXES)} files")
    digest = hashlib.sha256()
    total = 0
    for name in names:
        file_digest, size = cache.hash_file(folder / name) if cache is not None else _hash_file(folder / name)
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
        digest.update(file_digest)
        total += size
    if cache is not None:
        cache.keep_only({os.fspath(folder / name) for name in names})
    return FolderSnapshot(folder, tuple(names), digest.hexdigest(), total)


def _visible_files(folder: Path) -> Iterator[Path]:
    """Every entry but folders and dot names; a broken link is kept, so that reading it fails aloud."""
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() or (path.is_symlink() and not path.exists()):
            yield path


def _hash_file(path: Path) -> tuple[bytes, int]:
    sha = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                sha.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise TextSourceError(f"cannot read {path}: {e.strerror or e}") from e
    return sha.digest(), size
