"""Text sources for pretraining, each yielding `Document` records."""

from nanogpt_core.data.demo_corpus import iter_demo_documents
from nanogpt_core.data.documents import Document

__all__ = ["Document", "iter_demo_documents"]
