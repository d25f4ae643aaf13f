"""Replacing a file whole, so that a reader sees the old content or the new, never half.

The temporary file gets a unique name beside the target (two writers never share one; it
ends in `.tmp`, which retention recognises as a failed save's leftover), is flushed to disk
before the rename, and is removed again if anything fails on the way. Every file the library
writes for others to read goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


class PendingFile:
    """A binary file being written beside `path`: `commit` gives it that name, `discard` removes it.

    For writers that stream over a long time (a shard fills as documents are tokenized);
    the others use `replacing` or `write_bytes_atomically`.
    """

    def __init__(self, path: str | Path, *, mode: int = 0o644):
        self.path, self.mode = Path(path), mode
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp_name)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self, check: Callable[[Path], object] | None = None) -> Path:
        """Flush to disk, run `check` on the finished temporary file (it raises to refuse it), rename."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if check is not None:
                check(self.tmp)
            os.chmod(self.tmp, self.mode)  # mkstemp's 0600 would hide the file from a server running as another user
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_directory(self.path.parent)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: str | Path, *, mode: int = 0o644,
              check: Callable[[Path], object] | None = None) -> Iterator[BinaryIO]:
    """A binary file to write that takes `path`'s name only if the block ends without an error.

    `check`, when given, reads the finished temporary file before the rename and raises to
    refuse it (a download that is not what it claims never takes the real name).
    """
    pending = PendingFile(path, mode=mode)
    try:
        yield pending.file
    except BaseException:
        pending.discard()
        raise
    pending.commit(check)


def write_bytes_atomically(path: str | Path, data: bytes, *, mode: int = 0o644) -> Path:
    with replacing(path, mode=mode) as f:
        f.write(data)
    return Path(path)


def write_text_atomically(path: str | Path, text: str, *, mode: int = 0o644) -> Path:
    return write_bytes_atomically(path, text.encode("utf-8"), mode=mode)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
