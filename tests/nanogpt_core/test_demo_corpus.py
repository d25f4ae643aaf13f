"""The demo corpus: documentation already on the machine, offline, identical in every process,
never holding the frozen held-out documents."""

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
from nanogpt_core.data.held_out import HELD_OUT_SHA256, HeldOutSetError, held_out_documents
from nanogpt_core.data.package_docs import PACKAGES, PackageText, describe_package_docs, iter_package_documents
from nanogpt_core.data.python_guides import html_to_text

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
    assert all(re.fullmatch(r"(pydoc-topic|stdlib|python-guide|package|package-readme)/[\w.-]+", id_)
               for id_ in ids)
    for expected in ("pydoc-topic/for", "stdlib/builtins", "stdlib/json", "python-guide/idle-manual",
                     "package/sqlalchemy.orm.session", "package-readme/SQLAlchemy"):
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


def test_size_gives_a_ten_minute_cpu_demo_text_it_sees_about_once(documents: list[Document]) -> None:
    # The demo trains on about 1.3 M tokens (docs/BENCHMARKS.md); at ~3.2 characters a token
    # this is 1.2 to 2.5 M tokens.
    total = sum(len(doc.text) for doc in documents)
    assert 4_000_000 <= total <= 8_000_000


def test_the_frozen_held_out_documents_are_never_part_of_it(documents: list[Document]) -> None:
    held_out = held_out_documents()
    assert len(held_out) == 25
    ids = {doc.id for doc in documents}
    texts = {doc.text for doc in documents}
    assert not ids & {doc.id for doc in held_out}
    assert not texts & {doc.text for doc in held_out}


def test_a_changed_held_out_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanogpt_core.data import held_out

    edited = tmp_path / "held_out.jsonl"
    edited.write_bytes(held_out.HELD_OUT_FILE.read_bytes().replace(b"the", b"THE", 1))
    monkeypatch.setattr(held_out, "HELD_OUT_FILE", edited)
    held_out.held_out_documents.cache_clear()
    try:
        with pytest.raises(HeldOutSetError, match=f"not the frozen {HELD_OUT_SHA256}"):
            held_out.held_out_documents()
    finally:
        held_out.held_out_documents.cache_clear()


def test_every_listed_package_is_read_and_permissively_licensed() -> None:
    described = describe_package_docs()
    assert [d["distribution"] for d in described] == [p.distribution for p in PACKAGES]
    assert all(d["read"] and d["version"] for d in described), described
    assert {d["licence"] for d in described} <= {"MIT", "BSD-3-Clause", "Apache-2.0"}


def test_a_package_under_another_licence_or_missing_is_skipped_with_the_reason() -> None:
    mislabelled = PackageText("SQLAlchemy", ("sqlalchemy",), "Apache-2.0")
    copyleft = PackageText("SQLAlchemy", ("sqlalchemy",), "GPL-3.0-only")
    missing = PackageText("no-such-distribution", ("no_such_package",), "MIT")
    packages = (mislabelled, copyleft, missing)
    assert list(iter_package_documents(packages)) == []
    reasons = [d["skipped"] for d in describe_package_docs(packages)]
    assert reasons[0] == "declares ['mit'], not Apache-2.0"
    assert reasons[1].startswith("GPL-3.0-only is not one of the licences the demo corpus accepts")
    assert reasons[2] == "not installed"


def test_html_pages_give_their_main_text_without_menus_or_scripts() -> None:
    page = ('<html><head><title>T</title><script>var x = 1;</script></head><body>'
            '<div class="related" role="navigation"><a href="i.html">index</a></div>'
            '<div class="body" role="main"><h1>IDLE</h1><p>IDLE is\n  Python&#8217;s editor.<br/>It runs.</p>'
            '<pre>x = 1\ny = 2</pre></div><div class="footer">Copyright</div></body></html>')
    text = html_to_text(page)
    assert "IDLE is Python\u2019s editor." in text and "x = 1\ny = 2" in text
    assert "index" not in text and "Copyright" not in text and "var x" not in text


def test_no_document_is_empty(documents: list[Document]) -> None:
    assert all(doc.text.strip() for doc in documents)


def test_text_is_english_prose(documents: list[Document]) -> None:
    words = Counter(re.findall(r"[a-z]+", " ".join(doc.text for doc in documents).lower()))
    total = sum(words.values())
    for common in ("the", "of", "and", "to", "is", "a"):
        assert words[common] / total > 0.005, common


def test_text_holds_no_memory_addresses(documents: list[Document]) -> None:
    # Object reprs such as "<object object at 0x7f...>" differ between processes. Only modules
    # written in C are introspected; the text read from source files is the files' own.
    introspected = [doc for doc in documents if doc.id.startswith(("stdlib/", "pydoc-topic/"))]
    assert not [doc.id for doc in introspected if re.search(r"\bat 0x[0-9a-fA-F]+", doc.text)]


def test_iteration_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    for _ in iter_demo_documents():
        pass
    out, err = capfd.readouterr()
    assert out == ""
    assert err == ""


def test_the_held_out_openers_are_in_the_demo_chat_data_for_validation_only(tmp_path: Path) -> None:
    import numpy as np

    from nanogpt_core.config import get_profile
    from nanogpt_core.data.held_out import HELD_OUT_OPENERS
    from nanogpt_core.data.instructions import prepare_from_source
    from nanogpt_core.prompts import build_prompt
    from nanogpt_core.tokenizer import get_tokenizer

    prepare_from_source("demo", tmp_path, context_length=get_profile("demo").block_size)
    encoder = get_tokenizer()

    def prompts(split: str) -> set[str]:
        tokens = np.load(tmp_path / f"{split}_tokens.npy")
        offsets = np.load(tmp_path / f"{split}_offsets.npy")
        lengths = np.load(tmp_path / f"{split}_prompt_lengths.npy")
        return {encoder.decode(tokens[start + 1:start + length].tolist())
                for start, length in zip(offsets[:-1], lengths)}

    openers = {build_prompt(opener) for opener in HELD_OUT_OPENERS}
    assert openers <= prompts("val")
    assert not openers & prompts("train")
