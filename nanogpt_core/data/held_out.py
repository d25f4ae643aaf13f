"""The demo's fixed yardsticks: held-out documents and held-out conversation openers.

Both were frozen once and ship with the code, so a score measured on them means the same
thing after the training corpus grows, on any Python version:

- `held_out_documents()`: the 25 documents the 512-document demo corpus (Python 3.11.7) held
  out for validation when the set was frozen, stored verbatim in `frozen/demo_held_out.jsonl`.
  Their text is CPython's documentation, under the PSF License (see docs/DATA_PROCESSING.md).
  The demo corpus never yields a document with one of these ids, so no demo model trains on
  them; the report card's held-out loss and the demo-cloze benchmark are measured on them.
- `HELD_OUT_OPENERS`: ten first turns of chatterbot conversations that the demo fine-tuning
  data (prepared for the demo's 256-token context) keeps in its validation split and never in
  its training split, chosen by a rule: the first such opener of each category, in the corpus's
  file order; ten categories have one.
  The fine-tuned model's greedy replies to them are judged by `nanogpt_core.reply_quality`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from nanogpt_core.data.documents import Document

HELD_OUT_FILE = Path(__file__).resolve().parent / "frozen" / "demo_held_out.jsonl"
# The file's sha256 when it was frozen: any edit to it would silently move every score.
HELD_OUT_SHA256 = "6d9f71407cbe1bca3c6af4046158e66997c122b5d44820c295094e7d05fa1253"

HELD_OUT_OPENERS: tuple[str, ...] = (
    "How can I use your product?",
    "Who is your father",
    "can you write a mock test?",
    "What are you?",
    "Does that make you",
    "have you read plato",
    "is hal",
    "you are not sincere",
    "I LOVE BASEBALL",
    "According to Greek mythology who was the first woman on earth?",
)


class HeldOutSetError(RuntimeError):
    """The frozen held-out file is missing or was changed."""


@functools.lru_cache(maxsize=1)
def held_out_documents() -> tuple[Document, ...]:
    """The frozen held-out documents, in their frozen order."""
    try:
        data = HELD_OUT_FILE.read_bytes()
    except OSError as e:
        raise HeldOutSetError(f"cannot read the frozen held-out set {HELD_OUT_FILE}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELD_OUT_SHA256:
        raise HeldOutSetError(f"{HELD_OUT_FILE} has sha256 {digest}, not the frozen {HELD_OUT_SHA256}: "
                              f"the held-out set must not change (restore the file from git)")
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return tuple(Document(id=row["id"], text=row["text"]) for row in rows)


def held_out_ids() -> frozenset[str]:
    return frozenset(doc.id for doc in held_out_documents())
