"""Content hashes: equal content, equal hash; any change, another hash."""

from __future__ import annotations

import hashlib

import torch

from nanogpt_core.content_hash import file_sha256, files_version, tensors_version, version_of_parts


def test_a_file_hash_is_the_sha256_of_its_bytes_even_past_one_read_block(tmp_path):
    data = bytes(range(256)) * 9000  # a little over 2 MB: three read blocks
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_a_version_depends_on_names_contents_and_order(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one")
    b.write_text("two")
    version = files_version([a, b])
    assert len(version) == 16
    assert version == version_of_parts([("a.txt", file_sha256(a)), ("b.txt", file_sha256(b))])
    assert files_version([b, a]) != version
    b.write_text("three")
    assert files_version([a, b]) != version


def test_a_tensors_version_sees_every_value():
    state = {"w": torch.zeros(3, 2), "b": torch.ones(2)}
    version = tensors_version(state)
    assert tensors_version({k: v.clone() for k, v in state.items()}) == version
    state["w"][1, 1] = 1e-7
    assert tensors_version(state) != version
