"""What an exported folder holds, the error every conversion raises, and how its JSON files are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanogpt_core.atomic_file import write_text_atomically

EXPORT_FORMAT = "nanogpt-pipeline/hf-export"
HF_INIT_PREFIX = "hf:"  # how fine-tuning's --init-from names a Hugging Face folder or hub model
WEIGHTS_FILE = "model.safetensors"
LINEAGE_FILE = "lineage.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MODEL_CARD_FILE = "README.md"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json",
                   CHAT_TEMPLATE_FILE)
EXPORTED_FILES = (WEIGHTS_FILE, "config.json", "generation_config.json", *TOKENIZER_FILES, LINEAGE_FILE,
                  MODEL_CARD_FILE)


class HFFormatError(RuntimeError):
    """A folder or hub model that cannot be converted, with the reason in the message."""


def write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    write_text_atomically(path, json.dumps(value, indent=indent, ensure_ascii=False, default=str) + "\n")
