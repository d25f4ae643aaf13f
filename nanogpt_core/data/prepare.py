"""Pretraining data from a text source to raw parquet and/or token shards, in one command.

    python -m nanogpt_core.data.prepare --source fineweb-edu|local|demo [--path P] [--limit N] \\
        [--raw-out FILE.parquet] [--shards-out DIR [--val-fraction F] [--shard-tokens N]]

With both outputs the shards are built from the parquet file just written, so the source is
read once and the shards' manifest records the raw data's content hash. Prints one JSON
object summarising what was written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nanogpt_core.data.raw import RawDataError, RawStats, iter_raw_texts, read_raw_stats, write_raw_parquet
from nanogpt_core.data.text_sources import SOURCES, TextSourceError, describe_source, iter_documents
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
