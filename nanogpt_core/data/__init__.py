"""Where training text comes from, for pretraining and fine-tuning alike.

Pretraining reads documents (`Document`) from a text source (text_sources: FineWeb-Edu, local
files, the offline demo corpus, a watched folder), optionally through a raw parquet copy (raw),
into token shards (prepare). Fine-tuning reads instruction/response pairs (instructions:
Dolly-style files, databricks-dolly-15k, the offline chatterbot conversations) into padded
example arrays.
"""

from nanogpt_core.data.demo_corpus import iter_demo_documents
from nanogpt_core.data.documents import Document

__all__ = ["Document", "iter_demo_documents"]
