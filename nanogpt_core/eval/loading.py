"""Where benchmark examples come from: a file, the original HellaSwag download, the Hugging
Face copy, or the offline demo-cloze set.

What `load_eval_data(data, benchmark)` reads, by `data`:
  FILE                   JSON lines, plain or gzipped (see eval/examples.py)
  hf:Rowan/hellaswag     the Hugging Face copy, through `datasets.load_dataset`
  None                   for HellaSwag the original file, downloaded once from the
                         rowanz/hellaswag repository into $NANOGPT_CACHE_DIR (else
                         ~/.cache/nanogpt-pipeline); for demo-cloze the generated set
"""

from __future__ import annotations

import http.client
import shutil
import urllib.request
from pathlib import Path

from nanogpt_core.atomic_file import replacing

from nanogpt_core.eval.cloze import demo_cloze_data
from nanogpt_core.eval.examples import (BENCHMARKS, DEMO_CLOZE, HELLASWAG, EvalData, EvalDataError,
                                        EvalDataUnavailableError, example_from_record, read_examples_file)
from nanogpt_core.tokenizer import cache_dir

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_FILENAME = "hellaswag_val.jsonl"
HF_PREFIX = "hf:"
HF_DATASET = "Rowan/hellaswag"
DOWNLOAD_TIMEOUT_S = 30.0


def hellaswag_cache_path(directory: str | Path | None = None) -> Path:
    return Path(directory or cache_dir() / "hellaswag") / HELLASWAG_FILENAME


def fetch_hellaswag(url: str = HELLASWAG_URL, directory: str | Path | None = None) -> Path:
    """The original validation file from the cache, downloading it first if it is not there yet."""
    path = hellaswag_cache_path(directory)
    if path.is_file():
        return path
    hint = f"pass --data FILE with a local copy of {HELLASWAG_FILENAME}"
    try:
        # A broken download must never take the cache file's name, so it is read before the rename.
        with replacing(path, check=read_examples_file) as out:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out)
    except (OSError, http.client.HTTPException, EvalDataError) as e:  # URLError and timeouts are OSErrors
        reason = " ".join(str(getattr(e, "reason", e)).split()) or type(e).__name__
        raise EvalDataUnavailableError(f"cannot download HellaSwag from {url} into {path.parent} ({reason}); "
                                       f"{hint}") from None
    return path


def load_hf_hellaswag(name: str = HF_DATASET, split: str = "validation") -> EvalData:
    """The Hugging Face copy. Needs the `datasets` package and the hub (or its local cache)."""
    hint = f"pass --data FILE with a local copy of {HELLASWAG_FILENAME}"
    try:
        import datasets
    except ImportError:
        raise EvalDataUnavailableError(f"loading {name} needs the `datasets` package "
                                       f"(pip install datasets); or {hint}") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, hub outage: each layer raises its own kind
        message = " ".join(str(e).split())[:300]
        raise EvalDataUnavailableError(f"cannot load {name} ({split}) from the Hugging Face hub "
                                       f"({type(e).__name__}: {message}); {hint}") from None
    examples = [example_from_record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(rows)]
    if not examples:
        raise EvalDataError(f"{name}[{split}] holds no examples")
    return EvalData(benchmark=HELLASWAG, examples=examples, source=f"{HF_PREFIX}{name}/{split}")


def load_eval_data(data: str | Path | None = None, benchmark: str | None = None) -> EvalData:
    """The examples `data` names (see the module docstring); `benchmark` picks the default and is checked."""
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if data is None:
        if benchmark == DEMO_CLOZE:
            return demo_cloze_data()
        return read_examples_file(fetch_hellaswag())
    if str(data).startswith(HF_PREFIX):
        loaded = load_hf_hellaswag(str(data)[len(HF_PREFIX):] or HF_DATASET)
    else:
        loaded = read_examples_file(data)
    if benchmark is not None and loaded.benchmark != benchmark:
        raise EvalDataError(f"{loaded.source} holds {loaded.benchmark} examples, not {benchmark}")
    return loaded
