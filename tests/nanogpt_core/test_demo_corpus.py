"""The demo corpus: Python's own documentation, offline, identical in every process."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest

from nanogpt_core.data import Document, iter_demo_documents

REPO_ROOT = Path(__file__).resolve().parents[2]


def fingerprint(documents: Iterable[Document]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        # Lengths delimit the fields, so no two different corpora hash alike.
        for field in (doc.id, doc.text, doc.url or ""):
            data = field.encode()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return list(iter_demo_documents())


def test_ids_are_unique_and_name_their_source(documents: list[Document]) -> None:
    ids = [doc.id for doc in documents]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"(pydoc-topic|stdlib)/[\w.-]+", id_) for id_ in ids)
    for expected in ("pydoc-topic/for", "stdlib/builtins", "stdlib/json", "stdlib/email.message"):
        assert expected in ids


def test_two_calls_give_identical_documents(documents: list[Document]) -> None:
    assert list(iter_demo_documents()) == documents


def test_output_does_not_depend_on_the_hash_seed_or_the_process(documents: list[Document]) -> None:
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from nanogpt_core.data import iter_demo_documents\n"
        "from test_demo_corpus import fingerprint\n"
        "print(fingerprint(iter_demo_documents()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == fingerprint(documents)


def test_size_suits_a_short_cpu_demo(documents: list[Document]) -> None:
    total = sum(len(doc.text) for doc in documents)
    assert 1_500_000 <= total <= 2_500_000


def test_no_document_is_empty(documents: list[Document]) -> None:
    assert all(doc.text.strip() for doc in documents)


def test_text_is_english_prose(documents: list[Document]) -> None:
    words = Counter(re.findall(r"[a-z]+", " ".join(doc.text for doc in documents).lower()))
    total = sum(words.values())
    for common in ("the", "of", "and", "to", "is", "a"):
        assert words[common] / total > 0.005, common


def test_text_holds_no_memory_addresses(documents: list[Document]) -> None:
    # Object reprs such as "<object object at 0x7f...>" differ between processes.
    assert not [doc.id for doc in documents if re.search(r"\bat 0x[0-9a-fA-F]+", doc.text)]


def test_iteration_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    for _ in iter_demo_documents():
        pass
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""
