"""Token shards: GPT-2 token ids on disk, and the loader that feeds them to training.

Shard file format (version 1, after llm.c's):
    header   256 little-endian int32: [0] magic 20240520, [1] format version 1,
             [2] number of tokens; the rest zero
    body     that many little-endian uint16 token ids
Every document is preceded by `<|endoftext|>` (50256), so a shard is a plain stream of
documents and the model learns where one ends and the next begins.

A shard folder holds `train_NNNNNN.bin` and `val_NNNNNN.bin` files and a `manifest.json`,
written last, that lists each shard's token count and sha256 plus the folder's data version:
a hash of the shards' contents, so identical input gives an identical version.

    python -m nanogpt_core.shards build INPUT... --out DIR [--val-fraction F]
    python -m nanogpt_core.shards demo --out DIR

This package turns texts into shards and shards into batches; it reads no files of text
itself. The command line above lives with the text readers, in nanogpt_core/data/prepare.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt_core.atomic_file import PendingFile, write_bytes_atomically
from nanogpt_core.content_hash import file_sha256, version_of_parts

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per shard, as build-nanogpt's FineWeb shards
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


class ShardError(RuntimeError):
    """A shard file or shard folder that cannot be used, with the path at fault in the message."""


# ---------------------------------------------------------------------------------------------
# Reading and writing one shard


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write one shard atomically; return its sha256."""
    if tokens.dtype != np.uint16:
        raise TypeError(f"tokens must be uint16, got {tokens.dtype}")
    payload = _header(len(tokens)) + tokens.astype("<u2", copy=False).tobytes()
    write_bytes_atomically(path, payload)
    return hashlib.sha256(payload).hexdigest()


def _header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard's tokens after checking its header and length."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is truncated: {size} bytes, smaller than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"shard {path} is not a token shard (magic {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise ShardError(f"shard {path} has format version {header[1]}; this code reads version {VERSION}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise ShardError(f"shard {path} is corrupt or truncated: header says {n_tokens} tokens "
                         f"({expected} bytes) but the file has {size} bytes")
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if vocab_size is not None and n_tokens and int(tokens.max()) >= vocab_size:
        raise ShardError(f"shard {path} is corrupt: token id {int(tokens.max())} is outside the vocabulary "
                         f"of {vocab_size}")
    return tokens


# ---------------------------------------------------------------------------------------------
# Building a shard folder from documents


@dataclass
class ShardManifest:
    data_version: str
    shards: list[dict]  # name, split, tokens, sha256
    documents: dict[str, int]  # per split
    tokens: dict[str, int]  # per split
    bytes: int
    val_fraction: float
    source: dict

    @classmethod
    def load(cls, data_dir: str | Path) -> "ShardManifest":
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise ShardError(f"data folder {data_dir} does not exist; build one with "
                             f"`python -m nanogpt_core.shards build INPUT... --out {data_dir}`")
        path = data_dir / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"data folder {data_dir} has no {MANIFEST_NAME}: it is not a finished shard folder "
                             f"(an interrupted build leaves none); rebuild it with `python -m nanogpt_core.shards`")
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"{path} is not a valid shard manifest: {e}") from e

    def shard_paths(self, data_dir: str | Path, split: str) -> list[Path]:
        return [Path(data_dir) / s["name"] for s in self.shards if s["split"] == split]


class _ShardFile:
    """One shard streamed to disk: a header for a full shard first, then tokens as they come.

    Writing straight to the file keeps memory independent of the shard size. A shard that
    ends short of full (the last of a split) gets its header's count corrected at the end.
    """

    def __init__(self, path: Path, capacity: int):
        self.path, self.capacity, self.tokens = path, capacity, 0
        self.pending = PendingFile(path)
        self.file = self.pending.file
        self.file.write(_header(capacity))

    def append(self, tokens: np.ndarray) -> None:
        self.file.write(memoryview(tokens))
        self.tokens += len(tokens)

    def finish(self) -> str:
        """Close the shard, move it into place and return its sha256."""
        if self.tokens != self.capacity:
            self.file.seek(0)
            self.file.write(_header(self.tokens))
        self.file.flush()
        # Hashed from the file rather than as it streams, because a short shard's header
        # changes at the end; re-reading a just-written shard comes from the page cache.
        digest = file_sha256(self.pending.tmp)
        self.pending.commit()
        return digest

    def abandon(self) -> None:
        self.pending.discard()


class _SplitWriter:
    """Appends one split's tokens to a run of shards, starting a new one each time one fills."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.current: _ShardFile | None = None
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += len(tokens)
        while len(tokens):
            if self.current is None:
                self.current = _ShardFile(self.out_dir / f"{self.split}_{len(self.shards):06d}.bin", self.shard_tokens)
            take = min(len(tokens), self.shard_tokens - self.current.tokens)
            self.current.append(tokens[:take])
            tokens = tokens[take:]
            if self.current.tokens == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.current is not None:
            digest = self.current.finish()
            self.shards.append({"name": self.current.path.name, "split": self.split,
                                "tokens": self.current.tokens, "sha256": digest})
            self.current = None

    def abandon(self) -> None:
        if self.current is not None:
            self.current.abandon()
            self.current = None


@dataclass
class _EncodedChunk:
    tokens: dict[str, np.ndarray]  # per split: the chunk's documents, each after an <|endoftext|>
    documents: dict[str, int]  # per split


class _ChunkEncoder:
    """Encodes a run of consecutive documents into one token array per split.

    Tokens come from tiktoken as a uint32 buffer (`encode_to_numpy` with no special tokens
    allowed, the same tokens as `encode_ordinary`), so no Python int is created per token:
    tiktoken encodes without holding the GIL, and what does hold it is a few microseconds
    of Python per document rather than work proportional to its length.
    """

    def __init__(self, val_fraction: float):
        import tiktoken

        from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

        self.encoding = get_tokenizer()
        self.val_fraction = val_fraction
        self.eot = np.array([EOT_TOKEN], dtype=np.uint32)
        # Before tiktoken 0.11, encode_to_numpy mishandled special tokens in the text.
        self.to_numpy = _version_tuple(tiktoken.__version__) >= (0, 11)

    def encode(self, text: str) -> np.ndarray:
        if not self.to_numpy:
            return np.array(self.encoding.encode_ordinary(text), dtype=np.uint32)
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8 encoded; replace them as encode_ordinary does.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, disallowed_special=())

    def __call__(self, texts: list[str], first_index: int) -> _EncodedChunk:
        pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        for index, text in enumerate(texts, start=first_index):
            split = "val" if is_val_document(index, self.val_fraction) else "train"
            pieces[split] += (self.eot, self.encode(text))
        return _EncodedChunk(
            tokens={split: np.concatenate(p, dtype="<u2", casting="unsafe") if p else np.empty(0, dtype="<u2")
                    for split, p in pieces.items()},
            documents={split: len(p) // 2 for split, p in pieces.items()},
        )


def is_val_document(index: int, val_fraction: float) -> bool:
    """Spread the validation documents evenly through the corpus, deterministically.

    Document i goes to val when the running count floor(i * f) steps up at i + 1, so a
    fraction f of documents lands in val whatever the corpus order or length.
    """
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def build_shards(texts: Iterable[str], out_dir: str | Path, *, val_fraction: float = 0.01,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, source: dict | None = None,
                 batch_documents: int = 256, chunk_characters: int = 2**18,
                 threads: int | None = None) -> ShardManifest:
    """Tokenize documents into a shard folder, in constant memory; return its manifest.

    The input is cut into chunks of consecutive documents (at most `batch_documents`
    documents or about `chunk_characters` characters), which `threads` threads encode
    (default: one per usable core) while this thread reads ahead and writes finished chunks
    in input order. At most two chunks per thread are in flight, so memory does not grow
    with the corpus, and the same input always gives byte-identical shards.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    threads = threads or _usable_cores()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is unfinished until it is rewritten
    for split in SPLITS:
        for stale in out_dir.glob(f"{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"):
            stale.unlink()
    encode_chunk = _ChunkEncoder(val_fraction)
    writers = {split: _SplitWriter(out_dir, split, shard_tokens) for split in SPLITS}

    def write(chunk: _EncodedChunk) -> None:
        for split, writer in writers.items():
            writer.add(chunk.tokens[split], chunk.documents[split])

    index = 0
    pending: deque[Future[_EncodedChunk]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="tokenize") as pool:
        try:
            for chunk in _chunks(texts, batch_documents, chunk_characters):
                pending.append(pool.submit(encode_chunk, chunk, index))
                index += len(chunk)
                if len(pending) >= 2 * threads:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
        except BaseException:
            for future in pending:
                future.cancel()
            for writer in writers.values():
                writer.abandon()
            raise
    for writer in writers.values():
        writer.close()
    if writers["train"].tokens == 0:
        raise ShardError(f"no training text for {out_dir}: the input held {index} document(s), all empty or in val")
    shards = writers["train"].shards + writers["val"].shards
    manifest = ShardManifest(
        data_version=version_of_parts((shard["name"], shard["sha256"]) for shard in shards),
        shards=shards,
        documents={s: w.documents for s, w in writers.items()},
        tokens={s: w.tokens for s, w in writers.items()},
        bytes=sum(HEADER_BYTES + 2 * s["tokens"] for s in shards),
        val_fraction=val_fraction,
        source=source or {},
    )
    write_bytes_atomically(out_dir / MANIFEST_NAME, json.dumps(manifest.__dict__, indent=2).encode())
    return manifest


def _chunks(texts: Iterable[str], max_documents: int, max_characters: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    characters = 0
    for text in texts:
        chunk.append(text)
        characters += len(text)
        if len(chunk) >= max_documents or characters >= max_characters:
            yield chunk
            chunk, characters = [], 0
    if chunk:
        yield chunk


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Feeding training


class ShardLoader:
    """Yields (inputs, targets) batches of shape (B, T) from one split of a shard folder.

    With several processes, each step reads one contiguous window of B*T*world_size tokens
    and rank r takes the r-th slice, so ranks never see the same tokens. The loader's state
    is the window's start (shard index and offset); it is the same on every rank, so one
    saved state restores all of them exactly.
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None, *,
                 shrink_to_fit: bool = False):
        """With `shrink_to_fit`, a split too small for one batch gets a smaller batch instead of an
        error: fewer rows, then shorter rows (see `fitted_batch`). Meant for validation, where a
        small corpus's held-out documents may not fill one training-sized batch."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.manifest = ShardManifest.load(self.data_dir)
        self.paths = self.manifest.shard_paths(self.data_dir, split)
        if not self.paths:
            raise ShardError(f"data folder {self.data_dir} has no {split} shards")
        if shrink_to_fit:
            smallest = min(s["tokens"] for s in self.manifest.shards if s["split"] == split)
            batch_size, seq_len = fitted_batch(smallest, batch_size, seq_len, world_size, f"the {split} split of "
                                               f"{self.data_dir}")
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.vocab_size = vocab_size
        self.window = batch_size * seq_len * world_size
        self.reset()

    def reset(self) -> None:
        self._open(0)
        self.offset = 0

    def _open(self, shard_index: int) -> None:
        self.shard_index = shard_index
        self.tokens = read_shard(self.paths[shard_index], self.vocab_size)
        if len(self.tokens) < self.window + 1:
            raise ShardError(
                f"shard {self.paths[shard_index]} holds {len(self.tokens)} tokens, fewer than one step needs "
                f"({self.B} x {self.T} x {self.world_size} processes + 1 = {self.window + 1}); "
                f"use more text or a smaller batch")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offset + self.window + 1 > len(self.tokens):
            self._open((self.shard_index + 1) % len(self.paths))
            self.offset = 0
        start = self.offset + self.rank * self.B * self.T
        chunk = torch.from_numpy(self.tokens[start:start + self.B * self.T + 1].astype(np.int64))
        self.offset += self.window
        return chunk[:-1].view(self.B, self.T), chunk[1:].view(self.B, self.T)

    def state_dict(self) -> dict[str, int]:
        return {"shard_index": self.shard_index, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        shard_index = int(state["shard_index"])
        if not 0 <= shard_index < len(self.paths):
            raise ShardError(f"saved loader position names shard {shard_index}, but {self.data_dir} has "
                             f"{len(self.paths)} shard(s) in this split")
        self._open(shard_index)
        self.offset = int(state["offset"])


def fitted_batch(tokens: int, batch_size: int, seq_len: int, world_size: int, what: str) -> tuple[int, int]:
    """The largest (rows, row length) no bigger than asked for whose one step fits in `tokens`.

    Rows go first, so sequences keep their length while the split allows; one step reads
    rows x length tokens per process plus one for the last target.
    """
    usable = tokens - 1
    if usable >= batch_size * seq_len * world_size:
        return batch_size, seq_len
    rows = usable // (seq_len * world_size)
    if rows >= 1:
        return rows, seq_len
    length = usable // world_size
    if length < 1:
        raise ShardError(f"{what} holds {tokens} token(s): too few for one token per process "
                         f"({world_size}); give it more documents")
    return 1, length
