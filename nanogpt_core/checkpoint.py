"""Checkpoints: everything needed to resume training bit for bit, and to trace a model's origin.

A checkpoint is one `model_{step:05d}.pt` file holding a dict of tensors and plain Python
values (no pickled classes), so it loads with `torch.load(weights_only=True)` and can never
run code. It is written to a temporary name, flushed, and renamed: a crash mid-write leaves
at worst a `.tmp` file, never a broken `model_*.pt`. See docs/CHECKPOINT.md for the fields.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Collection
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from nanogpt_core.atomic_file import replacing
from nanogpt_core.model import GPT, GPTConfig

FORMAT = "nanogpt-pipeline/checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^model_(\d{5,})\.pt$")
# What every checkpoint holds, and what resuming a run needs on top (see docs/CHECKPOINT.md).
REQUIRED_FIELDS: dict[str, type] = {"step": int, "model_config": dict, "model": dict, "lineage": dict,
                                    "metrics": dict, "train_config": dict}
RESUME_FIELDS: dict[str, type] = {"optimizer": dict, "loader": dict, "rng": list}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file at fault in the message."""


def checkpoint_name(step: int) -> str:
    return f"model_{step:05d}.pt"


def unwrap_model(model: torch.nn.Module) -> GPT:
    """The bare GPT inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, step: int,
                    optimizer: torch.optim.Optimizer | None = None, train_config: dict | None = None,
                    loader_state: dict | None = None, rng_states: list | None = None,
                    lineage: dict | None = None, metrics: dict | None = None) -> Path:
    """Write a checkpoint atomically and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bare = unwrap_model(model)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "model_config": asdict(bare.config),
        "model": bare.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "train_config": train_config or {},
        "loader": loader_state or {},
        "rng": rng_states or [],
        "lineage": lineage or {},
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # A failed save (full disk, unpicklable value) leaves nothing behind.
    with replacing(path) as f:
        torch.save(payload, f)
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's dict, loaded safely and checked for shape; no model built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects that are not allowed to load safely "
                              f"(only tensors and plain values are): {e}") from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {e}") from e
    except Exception as e:  # noqa: BLE001
        # A file that is not a zip archive goes to torch's legacy reader, which fails on stray
        # bytes with whatever error the bytes lead it to (KeyError, IndexError, struct.error...).
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nanogpt-pipeline checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('format_version')}; "
                              f"this code reads version {FORMAT_VERSION}")
    _require_fields(payload, path, REQUIRED_FIELDS)
    return payload


def _require_fields(payload: dict[str, Any], path: Path, required: dict[str, type]) -> None:
    for name, kind in required.items():
        if not isinstance(payload.get(name), kind):
            raise CheckpointError(f"checkpoint {path} lacks a usable {name!r} field "
                                  f"(expected {kind.__name__}, found {type(payload.get(name)).__name__})")


def require_resumable(payload: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that holds weights but not the state a resume restores (an imported
    or exported model, say): optimizer, loader position and every rank's RNG."""
    _require_fields(payload, Path(path), RESUME_FIELDS)
    if not payload["rng"]:
        raise CheckpointError(f"checkpoint {path} records no RNG state, so a run cannot resume from it")


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """'field: checkpoint A vs run B' for each field that differs, fields in `ignore` aside.

    A field recorded on one side only counts as a difference: the two runs were not set up alike.
    """
    missing = "(not recorded)"
    return [f"{name}: checkpoint {saved.get(name, missing)} vs run {current.get(name, missing)}"
            for name in sorted(set(saved) | set(current))
            if name not in ignore and saved.get(name, missing) != current.get(name, missing)]


def model_config_of(payload: dict[str, Any], path: str | Path) -> GPTConfig:
    known = {f.name for f in fields(GPTConfig)}
    raw = payload.get("model_config", {})
    unknown = set(raw) - known
    if unknown:
        raise CheckpointError(f"checkpoint {path} has unknown model config fields: {', '.join(sorted(unknown))}")
    return GPTConfig(**raw)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """Build the model a checkpoint describes and load its weights: (model, checkpoint dict)."""
    payload = read_checkpoint(path, map_location)
    model = GPT(model_config_of(payload, path))
    load_model_weights(model, payload, path)
    return model.to(map_location), payload


def load_model_weights(model: torch.nn.Module, payload: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into an existing model, refusing a model of another shape."""
    bare = unwrap_model(model)
    saved = model_config_of(payload, path)
    if saved != bare.config:
        differences = ", ".join(f"{f.name}: checkpoint {getattr(saved, f.name)} vs run {getattr(bare.config, f.name)}"
                                for f in fields(GPTConfig) if getattr(saved, f.name) != getattr(bare.config, f.name))
        raise CheckpointError(f"checkpoint {path} was made with an incompatible model config ({differences})")
    try:
        bare.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from e


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoints in a folder, oldest step first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu", *,
                      resumable: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in a folder that loads, with its dict; None when there is none.

    A file that fails to load (damaged after it was written, or something else under a
    checkpoint's name) is reported and skipped, so a resume falls back to the one before it
    rather than failing. With `resumable`, so is one that lacks the state a resume needs.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            payload = read_checkpoint(path, map_location)
            if resumable:
                require_resumable(payload, path)
            return path, payload
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr, flush=True)
    return None


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; return what was deleted."""
    doomed = list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
