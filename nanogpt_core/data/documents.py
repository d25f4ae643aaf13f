"""The record every text source yields, so that downstream steps never care where text came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    # Stable across runs and machines: lineage and deduplication key on it.
    id: str
    text: str
    url: str | None = None
