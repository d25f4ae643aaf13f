"""Tokenizing into shards at scale: deterministic whatever the parallelism, flat in memory."""

import json
import subprocess
import sys

import numpy as np

from nanogpt_core.data.raw import iter_raw_texts
from nanogpt_core.shards import build_shards, read_shard
from nanogpt_core.tokenizer import EOT_TOKEN, get_tokenizer
from tests.conftest import PROJECT_ROOT, python_env


def shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_of_a_real_sample_are_byte_identical_whatever_the_threads_and_chunking(shared_data, tmp_path):
    sample = shared_data / "fineweb_edu" / "fineweb_edu_sample_155.parquet"
    settings = {"a": {}, "b": {}, "one_thread": {"threads": 1},
                "small_chunks": {"threads": 3, "batch_documents": 7, "chunk_characters": 5000}}
    manifests = {name: build_shards(iter_raw_texts(sample), tmp_path / name, val_fraction=0.05, shard_tokens=20_000,
                                    **kwargs)
                 for name, kwargs in settings.items()}
    assert len(manifests["a"].shards) >= 6  # several train shards and a val shard
    assert manifests["a"].documents == {"train": 148, "val": 7}
    reference = shard_bytes(tmp_path / "a")
    for name in settings:
        assert shard_bytes(tmp_path / name) == reference, name
        assert manifests[name].data_version == manifests["a"].data_version


def test_shard_tokens_are_each_documents_encode_ordinary_after_end_of_text(shared_data, tmp_path):
    texts = list(iter_raw_texts(shared_data / "fineweb" / "fineweb_sample_2800.parquet"))[:200]
    texts += ["Here <|endoftext|> is ordinary text, not a separator.", "a lone surrogate \ud800 is replaced", ""]
    build_shards(texts, tmp_path, val_fraction=0.0, shard_tokens=50_000)
    written = np.concatenate([read_shard(p) for p in sorted(tmp_path.glob("train_*.bin"))])
    encoding = get_tokenizer()
    expected = [token for text in texts for token in (EOT_TOKEN, *encoding.encode_ordinary(text))]
    assert written.tolist() == expected


# The child generates a corpus of `documents` documents, repeats it `repeats` times as a
# stream (so the corpus grows without the input growing in memory) and reports its peak RSS.
CHILD = r"""
import itertools, json, random, sys, tempfile
from nanogpt_core.shards import build_shards
from nanogpt_core.tokenizer import get_tokenizer

documents, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
texts = [" ".join(rng.choices(words, k=rng.randint(200, 2000))) + "." for _ in range(documents)]
get_tokenizer()

def peak_rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

before = peak_rss_kb()
with tempfile.TemporaryDirectory() as out:
    manifest = build_shards(itertools.chain.from_iterable(itertools.repeat(texts, repeats)), out,
                            val_fraction=0.01)
print(json.dumps({"before_kb": before, "peak_kb": peak_rss_kb(),
                  "tokens": manifest.tokens["train"] + manifest.tokens["val"]}))
"""


def build_in_child(documents: int, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(documents), str(repeats)], capture_output=True,
                          text=True, timeout=120, env=python_env(), cwd=PROJECT_ROOT, check=True)
    return json.loads(proc.stdout)


def test_peak_memory_stays_flat_when_the_corpus_grows_tenfold():
    small = build_in_child(documents=250, repeats=1)
    large = build_in_child(documents=250, repeats=10)
    assert large["tokens"] == 10 * small["tokens"] > 900_000
    # Measured from each child's peak before the build, so that start-up noise cancels.
    # Keeping the tokens in memory would cost 2 bytes each, about 18 MB more at 10x;
    # streaming them to shard files keeps the two builds' peaks within noise of each other.
    growth = {name: (run["peak_kb"] - run["before_kb"]) / 1024 for name, run in (("small", small), ("large", large))}
    assert growth["large"] - growth["small"] < 6, (
        f"peak RSS grew {growth['small']:.1f} MB building {small['tokens']:,} tokens "
        f"but {growth['large']:.1f} MB building {large['tokens']:,}")
