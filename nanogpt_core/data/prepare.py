"""Pretraining data from text to raw parquet and/or token shards: the data commands.

    python -m nanogpt_core.data.prepare --source fineweb-edu|local|demo|folder [--path P] [--limit N] \\
        [--raw-out FILE.parquet] [--shards-out DIR [--val-fraction F] [--shard-tokens N]]
    python -m nanogpt_core.shards build INPUT... --out DIR [--val-fraction F] [--shard-tokens N]
    python -m nanogpt_core.shards demo --out DIR

`prepare` reads one named source. With both outputs the shards are built from the parquet
file just written, so the source is read once and the shards' manifest records the raw
data's content hash. Prints one JSON object summarising what was written.

`shards build` tokenizes files given by hand: .txt and .md files are one document each,
JSON-lines and parquet files are read as the `local` source reads them. `shards demo` builds
the offline demo corpus. Both print one JSON line. They live here rather than in the shards
package so that the shard format depends on no text reader.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nanogpt_core.data.demo_corpus import iter_demo_documents
from nanogpt_core.data.raw import RawDataError, RawStats, iter_raw_texts, read_raw_stats, write_raw_parquet
from nanogpt_core.data.text_files import LOCAL_SUFFIXES, TextSourceError, iter_local_documents
from nanogpt_core.data.text_sources import SOURCES, describe_source, iter_documents
from nanogpt_core.shards import DEFAULT_SHARD_TOKENS, ShardError, ShardManifest, build_shards


def prepare_raw(source: str, out: str | Path, *, path: str | Path | None = None,
                limit: int | None = None) -> RawStats:
    """Write a source's documents to a parquet file (and its stats file); return the stats."""
    description = describe_source(source, path=path, limit=limit)
    return write_raw_parquet(iter_documents(source, path=path, limit=limit), out, source=description)


def shards_from_raw(raw_path: str | Path, out_dir: str | Path, *, val_fraction: float = 0.01,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS) -> ShardManifest:
    """Tokenize a finished raw parquet file into shards whose manifest names the raw data's version."""
    stats = read_raw_stats(raw_path)
    source = {"raw": str(Path(raw_path).resolve()), "raw_content_hash": stats.content_hash, **stats.source}
    return build_shards(iter_raw_texts(raw_path), out_dir, val_fraction=val_fraction,
                        shard_tokens=shard_tokens, source=source)


def shards_from_source(source: str, out_dir: str | Path, *, path: str | Path | None = None,
                       limit: int | None = None, val_fraction: float = 0.01,
                       shard_tokens: int = DEFAULT_SHARD_TOKENS) -> ShardManifest:
    """Tokenize a source's documents into shards directly, keeping no raw copy."""
    description = describe_source(source, path=path, limit=limit)
    texts = (doc.text for doc in iter_documents(source, path=path, limit=limit))
    return build_shards(texts, out_dir, val_fraction=val_fraction, shard_tokens=shard_tokens, source=description)


def prepare(source: str, *, path: str | Path | None = None, limit: int | None = None,
            raw_out: str | Path | None = None, shards_out: str | Path | None = None,
            val_fraction: float = 0.01, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict[str, Any]:
    """Write the requested outputs; return the summary the command line prints."""
    if raw_out is None and shards_out is None:
        raise ValueError("nothing to write: give raw_out, shards_out or both")
    summary: dict[str, Any] = {"source": describe_source(source, path=path, limit=limit)}
    if raw_out is not None:
        stats = prepare_raw(source, raw_out, path=path, limit=limit)
        summary["raw"] = {"path": str(raw_out), **{k: v for k, v in stats.to_dict().items() if k != "source"}}
    if shards_out is not None:
        if raw_out is not None:
            manifest = shards_from_raw(raw_out, shards_out, val_fraction=val_fraction, shard_tokens=shard_tokens)
        else:
            manifest = shards_from_source(source, shards_out, path=path, limit=limit,
                                          val_fraction=val_fraction, shard_tokens=shard_tokens)
        summary["shards"] = {"path": str(shards_out), "data_version": manifest.data_version,
                             "documents": manifest.documents, "tokens": manifest.tokens, "bytes": manifest.bytes,
                             "shards": len(manifest.shards)}
    return summary


def iter_texts_from_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Text of every document in plain-text, JSON-lines or parquet files (or folders of them).

    A .txt or .md file is one document; JSON lines and parquet rows are read as the `local`
    text source reads them (their `text` field, empty ones skipped).
    """
    for path in _expand(paths):
        if path.suffix in (".txt", ".md"):
            yield path.read_text(encoding="utf-8")
        elif path.name.endswith(LOCAL_SUFFIXES):
            yield from (doc.text for doc in iter_local_documents(path))
        else:
            raise TextSourceError(f"cannot read {path}: expected .txt, .md, .jsonl, .json(.gz) or .parquet")


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            yield path
        else:
            raise TextSourceError(f"input {path} does not exist")


def shards_main(argv: list[str] | None = None) -> None:
    """`python -m nanogpt_core.shards`."""
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.shards",
                                     description="Token shards from files of text, or from the demo corpus.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="tokenize .txt, .jsonl or .parquet files (a `text` field) into shards")
    build.add_argument("inputs", nargs="+", help="files or folders")
    demo = sub.add_parser("demo", help="shards of the offline demo corpus (CPython's documentation)")
    for p in (build, demo):
        p.add_argument("--out", required=True, help="shard folder to write")
        p.add_argument("--val-fraction", type=float, default=0.01 if p is build else 0.05)
        p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            texts = iter_texts_from_files(args.inputs)
            source = {"kind": "files", "inputs": [str(Path(p).resolve()) for p in args.inputs]}
        else:
            texts = (doc.text for doc in iter_demo_documents())
            source = {"kind": "demo", "python": sys.version.split()[0]}
        manifest = build_shards(texts, args.out, val_fraction=args.val_fraction,
                                shard_tokens=args.shard_tokens, source=source)
    except (TextSourceError, ShardError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"out": str(args.out), "data_version": manifest.data_version, "documents": manifest.documents,
                      "tokens": manifest.tokens, "bytes": manifest.bytes}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanogpt_core.data.prepare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--path", help="for --source local: a parquet or JSON-lines file, or a folder of them")
    parser.add_argument("--limit", type=int, help="read at most this many documents")
    parser.add_argument("--raw-out", type=Path, help="parquet file to write the documents to")
    parser.add_argument("--shards-out", type=Path, help="folder to write token shards to")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    args = parser.parse_args(argv)
    if args.raw_out is None and args.shards_out is None:
        parser.error("give --raw-out, --shards-out or both")
    try:
        summary = prepare(args.source, path=args.path, limit=args.limit, raw_out=args.raw_out,
                          shards_out=args.shards_out, val_fraction=args.val_fraction,
                          shard_tokens=args.shard_tokens)
    except (TextSourceError, RawDataError, ShardError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
