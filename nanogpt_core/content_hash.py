"""Content hashes: what data versions, cache checks and consistency checks are made of.

Data versions are the first 16 hex digits of a sha256, enough to tell versions apart and
short enough to read in the Dagster UI.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

VERSION_DIGITS = 16
_READ_BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks into one reused buffer (a 200 MB shard costs 1 MB)."""
    digest = hashlib.sha256()
    block = bytearray(_READ_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            digest.update(view[:n])
    return digest.hexdigest()


def version_of_parts(parts: Iterable[tuple[str, str]]) -> str:
    """A data version over named parts and their sha256s, in the order given ("name:sha256" lines)."""
    digest = hashlib.sha256()
    for name, sha256 in parts:
        digest.update(f"{name}:{sha256}\n".encode())
    return digest.hexdigest()[:VERSION_DIGITS]


def files_version(paths: Iterable[Path]) -> str:
    """A data version over files' names and contents, in the order given."""
    return version_of_parts((path.name, file_sha256(path)) for path in paths)


def tensors_version(tensors: Mapping[str, torch.Tensor]) -> str:
    """A data version over named tensors' values, in the mapping's order: equal exactly when every
    name and every byte is."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:VERSION_DIGITS]
