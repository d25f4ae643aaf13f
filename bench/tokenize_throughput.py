"""Tokenization throughput: our shard builder against build-nanogpt's method, end to end.

Every method reads the same parquet file, encodes its documents with GPT-2's tokenizer and
writes uint16 shards; the rate is tokens per second of wall-clock time for all of that.

    ideal        twice the single-thread `encode_ordinary` rate over texts already in memory
                 (two cores, no reading, no writing, no overhead)
    pool         build-nanogpt's fineweb.py: multiprocessing.Pool(2), imap of a function that
                 encodes one document (chunksize 16), shards filled and written in the parent
    batch        the previous build_shards: encode_ordinary_batch on 2 threads over batches
                 of 256 documents, Python lists converted to numpy
    ours         nanogpt_core.shards.build_shards over nanogpt_core.data.raw.iter_raw_texts

Methods run in alternating rounds (the order rotates every round) and the median is
reported, because a shared machine drifts. CPU seconds (this process and its children)
per million tokens show each method's overhead independently of what else is running.
Before timing, ours and pool are checked to produce the same token stream.

    python bench/tokenize_throughput.py [--input FILE.parquet] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import tiktoken

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanogpt_core.data.raw import iter_raw_texts  # noqa: E402
from nanogpt_core.shards import HEADER_INTS, MAGIC, VERSION, build_shards, read_shard  # noqa: E402
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer  # noqa: E402

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineweb" / "fineweb_sample_2800.parquet"
SHARD_TOKENS = 100_000_000  # build-nanogpt's shard size, also our default
WORKERS = 2


# --- build-nanogpt's method (after karpathy/build-nanogpt fineweb.py) -------------------

def _tokenize_one(text: str) -> np.ndarray:
    tokens = [EOT_TOKEN]
    tokens.extend(get_tokenizer().encode_ordinary(text))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def _write_datafile(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


def _fill_shards(token_arrays, out_dir: Path) -> int:
    """build-nanogpt's shard loop: the first shard is val, the rest train."""
    shard_index = token_count = total = 0
    buffer = np.empty(SHARD_TOKENS, dtype=np.uint16)
    for tokens in token_arrays:
        total += len(tokens)
        if token_count + len(tokens) < SHARD_TOKENS:
            buffer[token_count:token_count + len(tokens)] = tokens
            token_count += len(tokens)
        else:
            split = "val" if shard_index == 0 else "train"
            remainder = SHARD_TOKENS - token_count
            buffer[token_count:] = tokens[:remainder]
            _write_datafile(out_dir / f"{split}_{shard_index:06d}.bin", buffer)
            shard_index += 1
            buffer[:len(tokens) - remainder] = tokens[remainder:]
            token_count = len(tokens) - remainder
    if token_count:
        split = "val" if shard_index == 0 else "train"
        _write_datafile(out_dir / f"{split}_{shard_index:06d}.bin", buffer[:token_count])
    return total


def pool_method(parquet: Path, out_dir: Path) -> int:
    with mp.Pool(WORKERS) as pool:
        return _fill_shards(pool.imap(_tokenize_one, iter_raw_texts(parquet), chunksize=16), out_dir)


# --- the previous build_shards loop ------------------------------------------------------

def batch_method(parquet: Path, out_dir: Path) -> int:
    encoding = get_tokenizer()

    def arrays():
        batch: list[str] = []
        for text in iter_raw_texts(parquet):
            batch.append(text)
            if len(batch) == 256:
                yield from encoding.encode_ordinary_batch(batch, num_threads=WORKERS)
                batch = []
        if batch:
            yield from encoding.encode_ordinary_batch(batch, num_threads=WORKERS)

    return _fill_shards((np.asarray([EOT_TOKEN, *tokens], dtype=np.uint16) for tokens in arrays()), out_dir)


# --- ours ---------------------------------------------------------------------------------

def our_method(parquet: Path, out_dir: Path) -> int:
    manifest = build_shards(iter_raw_texts(parquet), out_dir, val_fraction=0.01, source={"kind": "bench"})
    return manifest.tokens["train"] + manifest.tokens["val"]


# --- measurement ----------------------------------------------------------------------------

def single_thread_encode(texts: list[str]) -> int:
    encoding = get_tokenizer()
    return sum(len(encoding.encode_ordinary(text)) + 1 for text in texts)  # +1: the separator


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run: Callable[[], int]) -> tuple[int, float, float]:
    cpu, wall = cpu_seconds(), time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - wall, cpu_seconds() - cpu


def check_same_tokens(parquet: Path, scratch: Path) -> int:
    """Ours (all documents in train) and pool must write the same token stream."""
    build_shards(iter_raw_texts(parquet), scratch / "ours", val_fraction=0.0)
    (scratch / "pool").mkdir()
    pool_method(parquet, scratch / "pool")
    ours = np.concatenate([read_shard(p) for p in sorted((scratch / "ours").glob("train_*.bin"))])
    theirs = np.concatenate([read_shard(p) for p in sorted((scratch / "pool").glob("*.bin"))])
    if not np.array_equal(ours, theirs):
        raise SystemExit("ours and pool wrote different tokens: the comparison would be meaningless")
    return len(ours)


def machine() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "usable cores": str(len(os.sched_getaffinity(0))),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "tiktoken": tiktoken.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
    }


def measure(parquet: Path, rounds: int) -> dict:
    info = machine()
    get_tokenizer()  # built once, outside every timing, and inherited by the pool's workers
    texts = pq.read_table(parquet, columns=["text"]).column(0).to_pylist()
    scratch = Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    try:
        tokens = check_same_tokens(parquet, scratch / "check")
        methods: dict[str, Callable[[Path], int]] = {
            "single": lambda out: single_thread_encode(texts),
            "pool": lambda out: pool_method(parquet, out),
            "batch": lambda out: batch_method(parquet, out),
            "ours": lambda out: our_method(parquet, out),
        }
        rates: dict[str, list[float]] = {name: [] for name in methods}
        cpu_per_m: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for round_index in range(rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                out = scratch / f"{name}-{round_index}"
                out.mkdir()
                n, wall, cpu = timed(lambda: methods[name](out))
                if n != tokens:
                    raise SystemExit(f"{name} produced {n} tokens, expected {tokens}")
                rates[name].append(n / wall)
                cpu_per_m[name].append(cpu / n * 1e6)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"input": parquet.name, "machine": info, "documents": len(texts),
            "characters": sum(map(len, texts)), "tokens": tokens, "rounds": rounds,
            "rates": rates, "cpu_s_per_m_tokens": cpu_per_m}


def print_table(results: dict) -> None:
    """Wall-clock rates, and CPU cost per token, which contention from other work inflates far less."""
    rates, cpu = results["rates"], results["cpu_s_per_m_tokens"]
    median = {name: statistics.median(r) for name, r in rates.items()}
    median_cpu = {name: statistics.median(c) for name, c in cpu.items()}
    ideal = WORKERS * median["single"]
    # Each round runs every method back to back, so a per-round ratio cancels slow drift.
    vs_pool = {name: statistics.median(a / b for a, b in zip(r, rates["pool"])) for name, r in rates.items()}
    rows = [
        ("single thread, encode_ordinary (in memory)", "single"),
        (f"ideal: {WORKERS} x single thread", None),
        (f"build-nanogpt: Pool({WORKERS}).imap, chunksize 16", "pool"),
        (f"previous build_shards: encode_ordinary_batch({WORKERS} threads)", "batch"),
        ("ours: build_shards(iter_raw_texts(...))", "ours"),
    ]
    print(f"\nTokenization throughput, {results['input']}: {results['documents']:,} documents, "
          f"{results['characters'] / 1e6:.1f} M characters, {results['tokens'] / 1e6:.2f} M tokens; "
          f"{results['rounds']} rounds")
    for key, value in results["machine"].items():
        print(f"  {key}: {value}")
    columns = ["method", "median M tok/s", "best", "vs pool", "vs ideal", "CPU s / M tok", "CPU vs ideal"]
    widths = [58, 14, 5, 7, 8, 13, 12]
    print()
    print("| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(columns, widths)))
          + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for label, name in rows:
        if name is None:
            cells = [label, f"{ideal / 1e6:.2f}", "", f"{ideal / median['pool']:.2f}x", "100%",
                     f"{median_cpu['single']:.3f}", "100%"]
        else:
            cells = [label, f"{median[name] / 1e6:.2f}", f"{max(rates[name]) / 1e6:.2f}", f"{vs_pool[name]:.2f}x",
                     f"{median[name] / ideal:.0%}", f"{median_cpu[name]:.3f}",
                     f"{median_cpu['single'] / median_cpu[name]:.0%}"]
        print("| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
              + " |")
    print(f"\nours vs pool: {vs_pool['ours']:.2f}x wall clock (median of per-round ratios; goal 1.3x), "
          f"{median_cpu['pool'] / median_cpu['ours']:.2f}x less CPU per token. "
          f"vs ideal: {median['ours'] / ideal:.0%} wall clock; {median_cpu['single'] / median_cpu['ours']:.0%} "
          f"of the ideal's CPU efficiency (its ceiling with both cores free and perfect scaling).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="parquet file with a `text` column")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not args.input.is_file():
        sys.exit(f"input {args.input} not found (pass --input FILE.parquet with a `text` column)")
    results = measure(args.input, args.rounds)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
