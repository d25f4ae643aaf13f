"""The benchmark examples' format: one four-way (or wider) choice per record, read from JSON lines.

A file holds one benchmark's examples, gzipped or not, one JSON object a line with `ctx`,
`endings` and `label`: rowanz/hellaswag's `hellaswag_val.jsonl` as published, a stripped copy
of it, or a file `write_examples` wrote. A `benchmark` field on the lines names a set that is
not HellaSwag (the offline demo-cloze set), so its scores are never reported as HellaSwag's.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from nanogpt_core.atomic_file import write_bytes_atomically
from nanogpt_core.content_hash import file_sha256

HELLASWAG = "hellaswag"
DEMO_CLOZE = "demo-cloze"
BENCHMARKS = (HELLASWAG, DEMO_CLOZE)
GZIP_MAGIC = b"\x1f\x8b"


class EvalDataError(ValueError):
    """A benchmark file that cannot be used; the message names the file, and the line where there is one."""


class EvalDataUnavailableError(RuntimeError):
    """No copy of the benchmark could be reached; the message says how to provide one."""


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int  # index of the true ending
    id: str  # the record's own index where it has one, else its line


@dataclass(frozen=True)
class EvalData:
    benchmark: str
    examples: list[Example]
    source: str  # file path, URL or hub name: what a report shows as `data`
    file_sha256: str | None = None


def example_from_record(record: Any, where: str) -> Example:
    """One example from a HellaSwag-shaped record; `where` (file:line) prefixes any error."""
    if not isinstance(record, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in record]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise EvalDataError(f"{where}: ctx must be a non-empty string")
    if (not isinstance(endings, list) or len(endings) < 2
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise EvalDataError(f"{where}: endings must be a list of at least two non-empty strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # the Hugging Face copy stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        hint = " (the test split has no labels)" if label == "" else ""
        raise EvalDataError(f"{where}: label must be an index into the {len(endings)} endings, got {label!r}{hint}")
    record_id = next((record[key] for key in ("ind", "idx", "id") if key in record), where)
    return Example(ctx=ctx, endings=tuple(endings), label=label, id=str(record_id))


def read_examples_file(path: str | Path) -> EvalData:
    """Examples from a JSON-lines file, gzipped or not. A `benchmark` field names a non-HellaSwag set."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    examples, names = [], set()
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise EvalDataError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                examples.append(example_from_record(record, where))
                name = record.get("benchmark", HELLASWAG)
                if name not in BENCHMARKS:
                    raise EvalDataError(f"{where}: unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
                names.add(name)
    except (OSError, EOFError) as e:  # gzip reports damage as BadGzipFile (an OSError) or EOFError
        raise EvalDataError(f"{path}: cannot be read after line {lineno} ({e})") from None
    if not examples:
        raise EvalDataError(f"{path}: holds no examples")
    if len(names) > 1:
        raise EvalDataError(f"{path}: mixes examples of several benchmarks ({', '.join(sorted(names))})")
    return EvalData(benchmark=names.pop(), examples=examples, source=str(path), file_sha256=file_sha256(path))


@contextlib.contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    with open(path, "rb") as f:
        gzipped = f.read(2) == GZIP_MAGIC
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        yield f


def examples_sha256(examples: Sequence[Example]) -> str:
    """A hash of exactly what is scored, whatever file, hub copy or generator it came from."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.ctx, list(ex.endings), ex.label], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def write_examples(path: str | Path, examples: Sequence[Example], benchmark: str) -> Path:
    """JSON lines that read_examples_file reads back under the same benchmark name."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    lines = [json.dumps({"benchmark": benchmark, "id": ex.id, "ctx": ex.ctx, "endings": list(ex.endings),
                         "label": ex.label}, ensure_ascii=False) for ex in examples]
    return write_bytes_atomically(path, ("\n".join(lines) + "\n").encode())
