"""Instruction data for fine-tuning: sources, tokenization with the prompt template, and batches.

Every source yields rows in the databricks-dolly-15k schema (`instruction`, `context`,
`response`, `category`):

    dolly   databricks/databricks-dolly-15k from the Hugging Face Hub, through `datasets`
    local   JSON-lines files in that schema (a file, or a folder of *.jsonl / *.jsonl.gz)
    demo    the English conversations of the `chatterbot-corpus` package, offline; a
            conversation's later exchanges carry the earlier turns as their context

A row becomes one training example: `<|endoftext|>` + the prompt (`nanogpt_core.prompts`) +
the response + `<|endoftext|>`. The loss sees only the response and the closing
`<|endoftext|>`: prompt positions and padding get target -1, which the model's loss ignores.
Rows that cannot make a sound example are skipped and counted by reason, never truncated.

A prepared folder holds, per split (`train`, `val`):

    {split}_tokens.npy          uint16, every example's tokens back to back
    {split}_offsets.npy         int64, n + 1 start offsets into the tokens
    {split}_prompt_lengths.npy  int32, how many leading tokens of each example are prompt

and `manifest.json`, written last: the source, row counts, skipped rows by reason, and the
data version (a hash of the arrays' bytes, so identical data gives an identical version).

    python -m nanogpt_core.data.instructions --source demo|local|dolly [--path FILE] --out DIR \\
        --context-length N [--limit N] [--val-fraction F]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from nanogpt_core.atomic_file import write_bytes_atomically
from nanogpt_core.content_hash import version_of_parts
from nanogpt_core.data.text_files import nonblank_lines
from nanogpt_core.losses import IGNORE_INDEX
from nanogpt_core.prompts import build_prompt, prompt_token_ids, render_history
from nanogpt_core.shards import is_val_document
from nanogpt_core.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_tokenizer

SOURCES = ("dolly", "local", "demo")
DOLLY_DATASET = "databricks/databricks-dolly-15k"
FIELDS = ("instruction", "context", "response", "category")
FORMAT = "nanogpt-pipeline/instructions"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
ARRAYS = ("tokens", "offsets", "prompt_lengths")
PAD_TOKEN = EOT_TOKEN  # what fills the inputs past an example's end; its targets are ignored anyway


class InstructionDataError(RuntimeError):
    """Instruction data that cannot be used, with the source or file at fault in the message."""


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class UnreadableRow:
    """A line of a JSON-lines file that is not JSON: passed on so that it is counted, not lost."""

    where: str
    error: str


def iter_instruction_rows(source: str, *, path: str | Path | None = None,
                          limit: int | None = None) -> Iterator[Any]:
    """Rows of a source in the Dolly schema, in a fixed order; `limit` stops after that many.

    Rows are passed on as read: checking them is the job of `prepare_instructions`, which
    counts the ones it skips.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown instruction source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "local":
        if path is None:
            raise ValueError("the local instruction source needs a path to a JSON-lines file or folder")
        rows: Iterator[Any] = _local_rows(Path(path))
    elif path is not None:
        raise ValueError(f"the {source} instruction source takes no path (got {path})")
    else:
        rows = _dolly_rows() if source == "dolly" else _chatterbot_rows()
    return itertools.islice(rows, limit)


def _dolly_rows() -> Iterator[dict]:
    offline_hint = "offline, use the local source (a Dolly-style .jsonl file) or the demo source"
    try:
        import datasets
    except ImportError as e:
        raise InstructionDataError(f"the dolly source needs the `datasets` package ({e}); {offline_hint}") from e
    _require_hub_reachable(offline_hint)
    try:
        dataset = datasets.load_dataset(DOLLY_DATASET, split="train")
    except Exception as e:  # datasets raises many kinds; one line is all a user needs
        message = " ".join(str(e).split())[:300]
        raise InstructionDataError(f"cannot load {DOLLY_DATASET} ({type(e).__name__}: {message}); "
                                   f"{offline_hint}") from e
    yield from dataset


def _require_hub_reachable(hint: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after `datasets`' minute of retries, when the Hub cannot be reached.

    Skipped in offline mode, where `datasets` reads its cache without asking the Hub.
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise InstructionDataError(f"cannot reach the Hugging Face Hub at {host}:{port} to load {DOLLY_DATASET} "
                                   f"({e}); {hint}") from e


def _local_rows(path: Path) -> Iterator[Any]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise InstructionDataError(f"folder {path} holds no .jsonl or .jsonl.gz files")
    elif path.is_file():
        files = [path]
    else:
        raise InstructionDataError(f"instruction file {path} does not exist")
    for file in files:
        for line_number, line in nonblank_lines(file):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield UnreadableRow(f"{file}:{line_number}", str(e))


def _chatterbot_rows() -> Iterator[dict]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as e:
        raise InstructionDataError(f"the demo instruction source needs the `chatterbot-corpus` and `pyyaml` "
                                   f"packages ({e})") from e
    english = Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"
    files = sorted(english.glob("*.yml"))
    if not files:
        raise InstructionDataError(f"no English conversations found in {english}")
    for file in files:
        corpus = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        category = (corpus.get("categories") or [file.stem])[0]
        for conversation in corpus.get("conversations") or []:
            if isinstance(conversation, list):
                yield from conversation_rows(conversation, category)
            else:  # a stray entry (one in trivia.yml is a lone string): counted as malformed
                yield conversation


def conversation_rows(turns: list[Any], category: str) -> Iterator[dict]:
    """One row per reply in a conversation whose speakers alternate, user first.

    The turns before a question become its context, rendered as the chat endpoint renders
    a history, so a multi-turn example looks like what the server will later send.
    """
    for reply in range(1, len(turns), 2):
        earlier = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(t)}
                   for i, t in enumerate(turns[:reply - 1])]
        yield {"instruction": turns[reply - 1], "context": render_history(earlier), "response": turns[reply],
               "category": category}


# ---------------------------------------------------------------------------------------------
# Rows to examples


def row_problem(row: Any) -> str | None:
    """Why a row cannot become an example (a reason to count it under), or None when it can."""
    if isinstance(row, UnreadableRow):
        return "invalid_json"
    if not isinstance(row, dict):
        return "not_an_object"
    if "instruction" not in row or "response" not in row:
        return "missing_field"
    context = row.get("context")
    if not isinstance(row["instruction"], str) or not isinstance(row["response"], str) \
            or not (context is None or isinstance(context, str)):
        return "not_a_string"
    if not row["instruction"].strip():
        return "empty_instruction"
    if not row["response"].strip():
        return "empty_response"
    return None


def encode_example(instruction: str, context: str, response: str) -> tuple[list[int], int]:
    """An example's tokens and how many of them are prompt.

    The prompt is encoded on its own, exactly as the server encodes it, and the response
    after it: encoding the joined text could merge tokens across the boundary, and the
    model would then learn a prompt ending it never sees at inference.
    """
    prompt = prompt_token_ids(build_prompt(instruction, context))
    response_ids = get_tokenizer().encode_ordinary(response.strip())
    return prompt + response_ids + [EOT_TOKEN], len(prompt)


def example_arrays(tokens: list[int], prompt_length: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one example, padded to `length` positions.

    Targets are the next token where that token is part of the response (or the closing
    `<|endoftext|>`), and -1 everywhere else: over the prompt and over the padding.
    """
    n_inputs = len(tokens) - 1
    if n_inputs > length:
        raise ValueError(f"example of {len(tokens)} tokens does not fit {length} positions")
    inputs = np.full(length, PAD_TOKEN, dtype=np.int64)
    targets = np.full(length, IGNORE_INDEX, dtype=np.int64)
    inputs[:n_inputs] = tokens[:-1]
    targets[prompt_length - 1:n_inputs] = tokens[prompt_length:]
    return inputs, targets


@dataclass
class InstructionManifest:
    format: str
    format_version: int
    data_version: str
    source: dict
    context_length: int
    val_fraction: float
    rows_read: int
    examples: dict[str, int]  # per split
    tokens: dict[str, int]  # per split, prompt and response together
    response_tokens: dict[str, int]  # per split: the positions the loss sees
    skipped: dict[str, int]  # by reason
    categories: dict[str, int]  # examples kept, by category

    @classmethod
    def load(cls, data_dir: str | Path) -> "InstructionManifest":
        data_dir = Path(data_dir)
        path = data_dir / MANIFEST_NAME
        if not path.is_file():
            raise InstructionDataError(f"{data_dir} is not a prepared instruction folder (no {MANIFEST_NAME}; an "
                                       f"interrupted preparation leaves none): prepare it with "
                                       f"`python -m nanogpt_core.data.instructions`")
        try:
            raw = json.loads(path.read_text())
            manifest = cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InstructionDataError(f"{path} is not a valid instruction manifest: {e}") from e
        if manifest.format != FORMAT or manifest.format_version != FORMAT_VERSION:
            raise InstructionDataError(f"{path} describes {manifest.format} version {manifest.format_version}; "
                                       f"this code reads {FORMAT} version {FORMAT_VERSION}")
        return manifest


def is_prepared_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def prepare_instructions(rows: Iterable[Any], out_dir: str | Path, *, context_length: int,
                         val_fraction: float = 0.05, source: dict | None = None) -> InstructionManifest:
    """Check, tokenize and split instruction rows into a prepared folder; return its manifest.

    `context_length` is the model's: an example fits when its inputs (every token but the
    last) do. Rows are split deterministically, every 1/val_fraction-th kept row to val.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    source = source or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is unfinished until it is rewritten

    splits: dict[str, dict[str, list]] = {s: {"tokens": [], "prompt_lengths": []} for s in SPLITS}
    skipped: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    rows_read = kept = 0
    for row in rows:
        rows_read += 1
        reason = row_problem(row)
        if reason is None:
            tokens, prompt_length = encode_example(row["instruction"], row.get("context") or "", row["response"])
            if len(tokens) - 1 > context_length:
                reason = "too_long"
        if reason is not None:
            skipped[reason] += 1
            continue
        split = splits["val" if is_val_document(kept, val_fraction) else "train"]
        split["tokens"].append(np.asarray(tokens, dtype=np.uint16))
        split["prompt_lengths"].append(prompt_length)
        category = row.get("category")
        categories[category if isinstance(category, str) and category else "unknown"] += 1
        kept += 1
    if kept == 0:
        described = json.dumps(source) if source else "the input"
        raise InstructionDataError(
            f"no usable instruction rows in {described}: {rows_read} row(s) read"
            + (f", skipped {dict(sorted(skipped.items()))}" if skipped else "")
            + f" (context length {context_length} tokens)")

    arrays: dict[str, np.ndarray] = {}
    for name, split in splits.items():
        lengths = np.array([len(t) for t in split["tokens"]], dtype=np.int64)
        arrays[f"{name}_tokens"] = (np.concatenate(split["tokens"]) if split["tokens"]
                                    else np.zeros(0, dtype=np.uint16))
        arrays[f"{name}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{name}_prompt_lengths"] = np.asarray(split["prompt_lengths"], dtype=np.int32)
    parts = []
    for name, array in arrays.items():
        payload = _npy_bytes(array)
        write_bytes_atomically(out_dir / f"{name}.npy", payload)
        parts.append((name, hashlib.sha256(payload).hexdigest()))

    n = {s: len(splits[s]["prompt_lengths"]) for s in SPLITS}
    total = {s: int(arrays[f"{s}_offsets"][-1]) for s in SPLITS}
    prompt_total = {s: int(arrays[f"{s}_prompt_lengths"].sum()) for s in SPLITS}
    manifest = InstructionManifest(
        format=FORMAT, format_version=FORMAT_VERSION, data_version=version_of_parts(parts), source=source,
        context_length=context_length, val_fraction=val_fraction, rows_read=rows_read, examples=n, tokens=total,
        response_tokens={s: total[s] - prompt_total[s] for s in SPLITS},
        skipped=dict(sorted(skipped.items())), categories=dict(sorted(categories.items())))
    write_bytes_atomically(out_dir / MANIFEST_NAME, json.dumps(asdict(manifest), indent=2).encode())
    return manifest


def prepare_from_source(source: str, out_dir: str | Path, *, context_length: int, path: str | Path | None = None,
                        limit: int | None = None, val_fraction: float = 0.05) -> InstructionManifest:
    """`prepare_instructions` over one of the named sources, recording which one in the manifest."""
    description: dict[str, Any] = {"kind": source}
    if source == "local":
        description["path"] = str(Path(path).resolve()) if path is not None else None
    elif source == "dolly":
        description["dataset"] = DOLLY_DATASET
    else:
        description["corpus"] = "chatterbot-corpus (english)"
    if limit is not None:
        description["limit"] = limit
    rows = iter_instruction_rows(source, path=path, limit=limit)
    return prepare_instructions(rows, out_dir, context_length=context_length, val_fraction=val_fraction,
                                source=description)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Feeding fine-tuning


class InstructionLoader:
    """Yields (inputs, targets) batches of shape (B, T) from one split of a prepared folder.

    Each step takes a window of B x world_size examples, and rank r the r-th B of them. With
    `shuffle`, every epoch visits the examples in an order drawn from (seed, epoch) and drops
    the remainder that does not fill a window; without it, windows walk the split in order
    and wrap around (for evaluation). T is the longest example in the whole window, so every
    rank pads to the same shape, or the context length with `pad_to_context`.

    The state is (epoch, window within it): the same on every rank, and with the seed it
    fixes every later batch, so restoring it resumes exactly.
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 seed: int = 0, shuffle: bool = True, pad_to_context: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.manifest = InstructionManifest.load(self.data_dir)
        self.tokens, self.offsets, self.prompt_lengths = (self._load(f"{split}_{name}") for name in ARRAYS)
        self.n = len(self.prompt_lengths)
        if len(self.offsets) != self.n + 1 or int(self.offsets[-1]) != len(self.tokens):
            raise InstructionDataError(f"{self.data_dir}: the {split} arrays disagree on the number of examples")
        if self.n and int(self.tokens.max()) >= VOCAB_SIZE:
            raise InstructionDataError(f"{self.data_dir}: token id {int(self.tokens.max())} is outside GPT-2's "
                                       f"vocabulary")
        self.B, self.rank, self.world_size = batch_size, rank, world_size
        self.window = batch_size * world_size
        self.seed, self.shuffle, self.pad_to_context = seed, shuffle, pad_to_context
        self.context_length = self.manifest.context_length
        if self.n == 0:
            raise InstructionDataError(f"{self.data_dir} has no {split} examples")
        if shuffle and self.n < self.window:
            raise InstructionDataError(
                f"{self.data_dir} has {self.n} {split} examples, fewer than one step takes "
                f"({batch_size} x {world_size} processes = {self.window}); use more data or a smaller batch")
        self._order_epoch: int | None = None
        self.reset()

    def _load(self, name: str) -> np.ndarray:
        path = self.data_dir / f"{name}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InstructionDataError(f"cannot read {path}: {e}") from e

    @property
    def windows_per_epoch(self) -> int:
        return self.n // self.window if self.shuffle else -(-self.n // self.window)

    def reset(self) -> None:
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self._order_epoch != self.epoch:
            self._cached_order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._order_epoch = self.epoch
        return self._cached_order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shuffle and self.position == self.windows_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.window
        indices = self._order()[np.arange(start, start + self.window) % self.n]
        self.position += 1
        lengths = self.offsets[indices + 1] - self.offsets[indices] - 1  # inputs per example
        length = self.context_length if self.pad_to_context else int(lengths.max())
        mine = indices[self.rank * self.B:(self.rank + 1) * self.B]
        inputs = np.empty((self.B, length), dtype=np.int64)
        targets = np.empty((self.B, length), dtype=np.int64)
        for row, index in enumerate(mine):
            example = self.tokens[self.offsets[index]:self.offsets[index + 1]].astype(np.int64)
            inputs[row], targets[row] = example_arrays(example, int(self.prompt_lengths[index]), length)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def progress(self) -> dict[str, float]:
        """How far through the data the loader is, in epochs (2.5 = half-way through the third)."""
        return {"epoch": self.epoch + self.position / self.windows_per_epoch}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise InstructionDataError(f"saved loader position was drawn with seed {state['seed']}, this run uses "
                                       f"{self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.data.instructions",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--path", help="the local source's JSON-lines file or folder")
    parser.add_argument("--out", required=True, help="prepared folder to write")
    parser.add_argument("--context-length", type=int, required=True,
                        help="the model's block size: longer examples are skipped")
    parser.add_argument("--limit", type=int, help="read at most this many rows")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        manifest = prepare_from_source(args.source, args.out, path=args.path, limit=args.limit,
                                       context_length=args.context_length, val_fraction=args.val_fraction)
    except (InstructionDataError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"out": str(args.out), "data_version": manifest.data_version, "rows_read": manifest.rows_read,
                      "examples": manifest.examples, "skipped": manifest.skipped}))


if __name__ == "__main__":
    main()
