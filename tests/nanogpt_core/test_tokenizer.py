"""The GPT-2 tokenizer: known ids, and how the rank file is found, provisioned and guarded."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken

from nanogpt_core import tokenizer
from nanogpt_core.tokenizer import (
    EOT_TOKEN,
    VOCAB_SIZE,
    TokenizerUnavailableError,
    get_tokenizer,
    gpt2_ranks_path,
)


@pytest.fixture(scope="module")
def gpt2() -> tiktoken.Encoding:
    try:
        return get_tokenizer()
    except TokenizerUnavailableError as exc:
        pytest.skip(f"no GPT-2 rank file on this machine and none could be provisioned: {exc}")


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv(tokenizer.CACHE_DIR_ENV, str(tmp_path))
    get_tokenizer.cache_clear()
    yield tmp_path
    get_tokenizer.cache_clear()


@pytest.fixture
def offline_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(name: str) -> tiktoken.Encoding:
        raise ConnectionError("openaipublic.blob.core.windows.net is unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)


@pytest.fixture
def pip_without_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real pip, unable to find any distribution, and without touching the network."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured find-links or mirrors
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def tiny_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="bytes",
        pat_str=tokenizer.GPT2_PAT_STR,
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={},
    )


@pytest.fixture
def tiktoken_serves_tiny_ranks(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """tiktoken answers with a 256-token encoding, and that file's hash is the pinned one."""
    ranks = tokenizer._serialize_ranks(tiny_encoding())
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: tiny_encoding())
    monkeypatch.setattr(tokenizer, "RANKS_SHA256", hashlib.sha256(ranks).hexdigest())
    return ranks


def assert_only_the_rank_file_in(cache: Path) -> None:
    # Nothing half-written or rejected may stay behind; the lock file is harmless.
    leftovers = {p.name for p in cache.iterdir()} - {"gpt2.tiktoken.lock"}
    assert leftovers <= {"gpt2.tiktoken"}


# The tokenizer itself


def test_known_ids(gpt2: tiktoken.Encoding) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [EOT_TOKEN]
    assert EOT_TOKEN == 50256
    assert gpt2.eot_token == EOT_TOKEN
    assert gpt2.n_vocab == VOCAB_SIZE == 50257


def test_round_trips_unicode_text(gpt2: tiktoken.Encoding) -> None:
    text = "Grüße, 世界! naïve café — 🦙🚀 \t\n  ‘quotes’ ½ Ωμέγα <|endoftext|> x"
    ids = gpt2.encode(text, allowed_special={"<|endoftext|>"})
    assert EOT_TOKEN in ids
    assert gpt2.decode(ids) == text


def test_special_token_text_is_refused_unless_allowed(gpt2: tiktoken.Encoding) -> None:
    # Raw web text containing the marker must not silently become a document boundary.
    with pytest.raises(ValueError):
        gpt2.encode("<|endoftext|>")


def test_is_cached(gpt2: tiktoken.Encoding) -> None:
    assert get_tokenizer() is get_tokenizer()


def test_rank_file_is_the_verified_one(gpt2: tiktoken.Encoding) -> None:
    path = gpt2_ranks_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer.RANKS_SHA256


def test_tiktoken_ranks_serialize_to_the_pinned_file(gpt2: tiktoken.Encoding) -> None:
    # What the tiktoken source writes must be byte-identical to r50k_base.tiktoken.
    serialized = tokenizer._serialize_ranks(gpt2)
    assert hashlib.sha256(serialized).hexdigest() == tokenizer.RANKS_SHA256


def test_split_pattern_is_tiktokens_gpt2_pattern() -> None:
    from tiktoken_ext.openai_public import r50k_pat_str

    assert tokenizer.GPT2_PAT_STR == r50k_pat_str


# Finding and provisioning the rank file


def test_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tokenizer.CACHE_DIR_ENV, str(tmp_path))
    assert tokenizer.cache_dir() == tmp_path
    monkeypatch.delenv(tokenizer.CACHE_DIR_ENV)
    assert tokenizer.cache_dir() == Path.home() / ".cache" / "nanogpt-pipeline"


def test_provisions_from_the_pypi_sdist(
    empty_cache: Path, offline_tiktoken: None, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "openai-whisper"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index: {probe.stderr.strip()[-300:]}")

    path = gpt2_ranks_path()

    assert path == empty_cache / "gpt2.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokenizer.RANKS_SHA256
    assert "provisioning GPT-2 BPE ranks" in capsys.readouterr().err
    assert get_tokenizer().encode("Hello world") == [15496, 995]
    assert_only_the_rank_file_in(empty_cache)


def test_provisions_from_tiktoken_when_it_answers(
    empty_cache: Path, tiktoken_serves_tiny_ranks: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pip_must_not_run() -> bytes:
        raise AssertionError("PyPI was asked although tiktoken answered")

    monkeypatch.setattr(tokenizer, "_ranks_from_pypi_sdist", pip_must_not_run)

    assert gpt2_ranks_path().read_bytes() == tiktoken_serves_tiny_ranks
    assert_only_the_rank_file_in(empty_cache)


def test_concurrent_cold_starts_provision_once(
    empty_cache: Path, tiktoken_serves_tiny_ranks: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As when every torchrun rank on a fresh machine asks for the tokenizer at once.
    calls = []

    def slow_tiny_encoding(name: str) -> tiktoken.Encoding:
        calls.append(name)
        time.sleep(0.2)
        return tiny_encoding()

    monkeypatch.setattr(tiktoken, "get_encoding", slow_tiny_encoding)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: gpt2_ranks_path(), range(4)))

    assert paths == [empty_cache / "gpt2.tiktoken"] * 4
    assert len(calls) == 1
    assert_only_the_rank_file_in(empty_cache)


def test_a_verified_cached_file_is_used_without_provisioning(
    empty_cache: Path, tiktoken_serves_tiny_ranks: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    (empty_cache / "gpt2.tiktoken").write_bytes(tiktoken_serves_tiny_ranks)

    def no_source_may_run() -> bytes:
        raise AssertionError("a source was asked although the cache holds a verified file")

    monkeypatch.setattr(tokenizer, "_ranks_from_tiktoken", no_source_may_run)
    monkeypatch.setattr(tokenizer, "_ranks_from_pypi_sdist", no_source_may_run)

    assert gpt2_ranks_path() == empty_cache / "gpt2.tiktoken"


def test_a_corrupted_cached_file_is_replaced(
    empty_cache: Path, tiktoken_serves_tiny_ranks: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    cached = empty_cache / "gpt2.tiktoken"
    cached.write_bytes(b"not the GPT-2 ranks\n")

    assert gpt2_ranks_path().read_bytes() == tiktoken_serves_tiny_ranks
    assert f"{cached}: sha256" in capsys.readouterr().err
    assert_only_the_rank_file_in(empty_cache)


def test_a_corrupted_cached_file_is_removed_and_named_when_nothing_replaces_it(
    empty_cache: Path, offline_tiktoken: None, pip_without_index: None
) -> None:
    cached = empty_cache / "gpt2.tiktoken"
    corrupted = b"not the GPT-2 ranks\n"
    cached.write_bytes(corrupted)

    with pytest.raises(TokenizerUnavailableError) as raised:
        get_tokenizer()

    assert f"{cached}: sha256 {hashlib.sha256(corrupted).hexdigest()}" in str(raised.value)
    assert not cached.exists()
    assert_only_the_rank_file_in(empty_cache)


def test_when_every_source_fails_the_error_says_what_was_tried_and_what_to_do(
    empty_cache: Path, offline_tiktoken: None, pip_without_index: None
) -> None:
    with pytest.raises(TokenizerUnavailableError) as raised:
        get_tokenizer()

    message = str(raised.value)
    assert f"{empty_cache / 'gpt2.tiktoken'}: missing" in message
    assert "tiktoken.get_encoding('gpt2'): ConnectionError" in message
    assert "openai-whisper==20250625 via pip: RuntimeError: pip download exited" in message
    assert tokenizer.RANKS_SHA256 in message
    assert tokenizer.CACHE_DIR_ENV in message
    assert_only_the_rank_file_in(empty_cache)


def test_a_source_with_the_wrong_bytes_is_discarded(
    empty_cache: Path, offline_tiktoken: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer, "_ranks_from_pypi_sdist", lambda: b"tampered\n")

    with pytest.raises(TokenizerUnavailableError, match="discarded"):
        gpt2_ranks_path()

    assert not (empty_cache / "gpt2.tiktoken").exists()
    assert_only_the_rank_file_in(empty_cache)


def test_a_stalled_tiktoken_download_is_abandoned(
    empty_cache: Path, pip_without_index: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def stalls(name: str) -> tiktoken.Encoding:
        release.wait(timeout=30)
        raise ConnectionError("released by the test")

    monkeypatch.setattr(tiktoken, "get_encoding", stalls)
    monkeypatch.setattr(tokenizer, "_TIKTOKEN_TIMEOUT_S", 0.2)
    try:
        with pytest.raises(TokenizerUnavailableError, match=r"TimeoutError: no answer within 0\.2"):
            gpt2_ranks_path()
    finally:
        release.set()
