"""A checkpoint written as a transformers GPT-2 folder that loads with no network."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nanogpt_core.atomic_file import write_bytes_atomically, write_text_atomically
from nanogpt_core.checkpoint import CheckpointError, latest_checkpoint, model_config_of, read_checkpoint
from nanogpt_core.content_hash import files_version
from nanogpt_core.hf.files import (EXPORT_FORMAT, EXPORTED_FILES, LINEAGE_FILE, MODEL_CARD_FILE, WEIGHTS_FILE,
                                   HFFormatError, write_json)
from nanogpt_core.hf.model_card import model_card
from nanogpt_core.hf.tokenizer_files import write_tokenizer_files
from nanogpt_core.hf.weights import generation_config, hf_config, to_hf_state_dict
from nanogpt_core.model import GPT2_VOCAB_SIZE


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    files: dict[str, int]  # name -> bytes
    content_hash: str  # over every file's name and sha256: equal folders, equal hash
    model_card: str
    parameters: int


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself, or the newest complete checkpoint when it is a run folder."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        return found[0]
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, scores: Mapping[str, Any] | None = None,
                      title: str = "nanogpt-pipeline GPT-2") -> ExportResult:
    """Write `checkpoint` (a file, or a run folder's newest) as a transformers GPT-2 folder.

    `scores`: benchmark results to record in the model card and lineage.json, for example
    the deployment manifest's. Files of the same names in `out_dir` are replaced.
    """
    from safetensors.torch import save

    checkpoint = resolve_checkpoint(checkpoint)
    payload = read_checkpoint(checkpoint)
    config = model_config_of(payload, checkpoint)
    if config.vocab_size < GPT2_VOCAB_SIZE:
        raise HFFormatError(f"{checkpoint}: vocab_size {config.vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    weights = to_hf_state_dict(payload["model"])
    write_bytes_atomically(out_dir / WEIGHTS_FILE, save(weights, metadata={"format": "pt"}))
    write_json(out_dir / "config.json", hf_config(config))
    write_json(out_dir / "generation_config.json", generation_config())
    write_tokenizer_files(out_dir, config.block_size)

    parameters = sum(t.numel() for t in weights.values())
    record = {
        "format": EXPORT_FORMAT,
        "format_version": 1,
        "checkpoint": str(checkpoint.resolve()),
        "step": payload["step"],
        "created": payload.get("created"),
        "parameters": parameters,
        "model_config": asdict(config),
        "lineage": payload.get("lineage", {}),
        "metrics": payload.get("metrics", {}),
        "train_config": payload.get("train_config", {}),
        "scores": dict(scores or {}),
    }
    write_json(out_dir / LINEAGE_FILE, record)
    card = model_card(record, title)
    write_text_atomically(out_dir / MODEL_CARD_FILE, card)

    files = {name: (out_dir / name).stat().st_size for name in sorted(EXPORTED_FILES)}
    return ExportResult(out_dir, files, folder_content_hash(out_dir, files), card, parameters)


def folder_content_hash(folder: Path, names: Iterable[str]) -> str:
    """The first 16 hex digits of a sha256 over the named files' names and sha256s."""
    return files_version(folder / name for name in sorted(names))
