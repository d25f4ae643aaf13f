"""Token shards: the on-disk format, deterministic builds, and a loader that resumes exactly."""

import json

import numpy as np
import pytest
import torch

from nanogpt_core.shards import (HEADER_BYTES, MAGIC, ShardError, ShardLoader, ShardManifest, build_shards,
                                 fitted_batch, is_val_document, read_shard, write_shard)
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer

TEXTS = [f"Document number {i} talks about topic {i % 7} at some length. " * (5 + i % 11) for i in range(300)]


def test_a_shard_is_a_256_int_header_then_uint16_tokens(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.array([1, 2, 50256], dtype=np.uint16))
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert (header[0], header[1], header[2]) == (MAGIC, 1, 3)
    assert not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == [1, 2, 50256]
    assert read_shard(path).tolist() == [1, 2, 50256]


def test_every_document_starts_with_end_of_text(tmp_path):
    build_shards(["Hello world", "Second one"], tmp_path, val_fraction=0.0)
    tokens = read_shard(tmp_path / "train_000000.bin").tolist()
    enc = get_tokenizer()
    assert tokens == [EOT_TOKEN, *enc.encode("Hello world"), EOT_TOKEN, *enc.encode("Second one")]


def test_building_twice_gives_byte_identical_shards_and_the_same_data_version(tmp_path):
    first = build_shards(TEXTS, tmp_path / "a", val_fraction=0.1, shard_tokens=5000)
    second = build_shards(TEXTS, tmp_path / "b", val_fraction=0.1, shard_tokens=5000)
    assert first.data_version == second.data_version
    assert len(first.shards) > 2  # the corpus really spans several shards
    for shard in first.shards:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    changed = build_shards(TEXTS[:-1] + ["something else"], tmp_path / "c", val_fraction=0.1, shard_tokens=5000)
    assert changed.data_version != first.data_version


def test_the_manifest_counts_documents_tokens_and_bytes_per_split(tmp_path):
    manifest = build_shards(TEXTS, tmp_path, val_fraction=0.1, shard_tokens=5000)
    assert manifest.documents == {"train": 270, "val": 30}
    assert sum(s["tokens"] for s in manifest.shards if s["split"] == "val") == manifest.tokens["val"] > 0
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("*.bin"))
    assert manifest.bytes == on_disk
    assert ShardManifest.load(tmp_path) == manifest


def test_validation_documents_are_spread_evenly():
    picked = [i for i in range(100) if is_val_document(i, 0.05)]
    assert picked == [19, 39, 59, 79, 99]


def test_rank_slices_of_one_step_are_disjoint_and_cover_the_window(tmp_path):
    build_shards(TEXTS, tmp_path, val_fraction=0.1)
    tokens = torch.from_numpy(read_shard(tmp_path / "train_000000.bin").astype(np.int64))
    loaders = [ShardLoader(tmp_path, "train", batch_size=2, seq_len=8, rank=r, world_size=2) for r in range(2)]
    x0, y0 = loaders[0].next_batch()
    x1, _ = loaders[1].next_batch()
    assert torch.equal(torch.cat([x0.flatten(), x1.flatten()]), tokens[:32])
    assert torch.equal(y0.flatten(), tokens[1:17])
    x0_next, _ = loaders[0].next_batch()
    assert torch.equal(x0_next.flatten(), tokens[32:48])


def test_a_restored_loader_continues_exactly_where_the_saved_one_was(tmp_path):
    build_shards(TEXTS, tmp_path, val_fraction=0.1, shard_tokens=3000)
    loader = ShardLoader(tmp_path, "train", batch_size=4, seq_len=16)
    for _ in range(70):  # far enough to cross into later shards
        loader.next_batch()
    state = loader.state_dict()
    assert state["shard_index"] > 0
    expected = [loader.next_batch() for _ in range(5)]
    restored = ShardLoader(tmp_path, "train", batch_size=4, seq_len=16)
    restored.load_state_dict(json.loads(json.dumps(state)))
    for (x, y), (ex, ey) in zip((restored.next_batch() for _ in range(5)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_truncated_shard_is_named_in_the_error(tmp_path):
    build_shards(TEXTS, tmp_path, val_fraction=0.1)
    shard = tmp_path / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match="train_000000.bin is corrupt or truncated"):
        ShardLoader(tmp_path, "train", batch_size=2, seq_len=8)


def test_a_file_that_is_not_a_shard_is_named_in_the_error(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00" * 2000)
    with pytest.raises(ShardError, match="x.bin is not a token shard"):
        read_shard(path)


def test_token_ids_outside_the_vocabulary_are_caught(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.array([1, 60000], dtype=np.uint16))
    with pytest.raises(ShardError, match="outside the vocabulary"):
        read_shard(path, vocab_size=50304)


def test_a_missing_data_folder_says_how_to_build_one(tmp_path):
    with pytest.raises(ShardError, match=r"data folder .*nowhere does not exist.*nanogpt_core.shards build"):
        ShardLoader(tmp_path / "nowhere", "train", batch_size=2, seq_len=8)


def test_a_folder_without_a_manifest_is_unfinished(tmp_path):
    build_shards(TEXTS, tmp_path, val_fraction=0.1)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardLoader(tmp_path, "train", batch_size=2, seq_len=8)


def test_a_shard_too_small_for_one_step_says_so(tmp_path):
    build_shards(["tiny text"], tmp_path, val_fraction=0.0)
    with pytest.raises(ShardError, match="fewer than one step needs"):
        ShardLoader(tmp_path, "train", batch_size=4, seq_len=64)


def test_the_command_line_builds_from_jsonl_text_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanogpt_core.data.prepare import shards_main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:50]))
    (tmp_path / "in" / "b.txt").write_text("A plain text document.")
    pq.write_table(pa.table({"id": ["x", "y"], "text": TEXTS[50:52]}), tmp_path / "in" / "c.parquet")
    shards_main(["build", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"])
    manifest = ShardManifest.load(tmp_path / "out")
    assert manifest.documents["train"] + manifest.documents["val"] == 53


def test_a_jsonl_line_without_text_is_reported_with_its_line_number(tmp_path):
    from nanogpt_core.data.prepare import iter_texts_from_files
    from nanogpt_core.data.text_sources import TextSourceError

    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(TextSourceError, match=r"bad.jsonl:2 is not a JSON object with a 'text' field"):
        list(iter_texts_from_files([path]))


def test_a_split_too_small_for_one_batch_gets_fewer_rows_then_shorter_rows():
    assert fitted_batch(10_000, 4, 64, 2, "val") == (4, 64)  # fits: unchanged
    assert fitted_batch(291, 4, 64, 2, "val") == (2, 64)  # 290 usable tokens: two rows of 64 per process
    assert fitted_batch(29, 4, 64, 2, "val") == (1, 14)  # not one row: shorter rows
    with pytest.raises(ShardError, match="the val split of data holds 2 token"):
        fitted_batch(2, 4, 64, 2, "the val split of data")


def test_a_loader_asked_to_shrink_reads_the_whole_small_split_without_overlap(tmp_path):
    build_shards(TEXTS[:40], tmp_path, val_fraction=0.05)
    val_tokens = ShardManifest.load(tmp_path).tokens["val"]
    with pytest.raises(ShardError, match="fewer than one step needs"):
        ShardLoader(tmp_path, "val", 64, 64)
    ranks = [ShardLoader(tmp_path, "val", 64, 64, rank, 2, shrink_to_fit=True) for rank in range(2)]
    (x0, y0), (x1, _) = ranks[0].next_batch(), ranks[1].next_batch()
    B, T = ranks[0].B, ranks[0].T
    assert (B, T) != (64, 64) and B * T * 2 + 1 <= val_tokens
    assert x0.shape == x1.shape == (B, T) and torch.equal(x0.flatten()[1:], y0.flatten()[:-1])
    assert not torch.equal(x0, x1)  # each rank its own slice
