"""The deployment manifest: the JSON file that names the checkpoint the server should serve.

The pipeline's `deployed_model` asset writes it (with `write_manifest`), the server reads
it (with `read_manifest`) and follows it when it changes. It is always replaced whole
(temporary file, then rename), so a reader sees the old manifest or the new one, never
half of either.

    {"format": "nanogpt-pipeline/deployment", "format_version": 1,
     "deployment_id": "...", "model_id": "nanogpt",
     "checkpoint_path": "/abs/path/model_00599.pt", "checkpoint_name": "model_00599.pt",
     "lineage": {...}, "scores": {"benchmark": "hellaswag", "acc": .., "acc_norm": .., "n": ..},
     "deployed_at": "2025-01-01T00:00:00+00:00"}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORMAT = "nanogpt-pipeline/deployment"
FORMAT_VERSION = 1
DEFAULT_MODEL_ID = "nanogpt"


class ManifestError(ValueError):
    """A manifest that cannot be used, with the file and the reason in the message."""


@dataclass(frozen=True)
class Manifest:
    deployment_id: str
    model_id: str
    checkpoint_path: str
    checkpoint_name: str
    lineage: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    deployed_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_REQUIRED_STRINGS = ("deployment_id", "model_id", "checkpoint_path", "checkpoint_name")


def parse_manifest(data: Any, source: str = "manifest") -> Manifest:
    """Validate a manifest's decoded JSON; relative checkpoint paths are not accepted."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{source}: format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{source}: format_version {data.get('format_version')!r}; "
                            f"this server reads version {FORMAT_VERSION}")
    for name in _REQUIRED_STRINGS:
        if not isinstance(data.get(name), str) or not data[name]:
            raise ManifestError(f"{source}: '{name}' must be a non-empty string")
    if not os.path.isabs(data["checkpoint_path"]):
        raise ManifestError(f"{source}: checkpoint_path must be absolute, got {data['checkpoint_path']!r}")
    for name in ("lineage", "scores"):
        if not isinstance(data.get(name, {}), dict):
            raise ManifestError(f"{source}: '{name}' must be an object")
    return Manifest(
        deployment_id=data["deployment_id"],
        model_id=data["model_id"],
        checkpoint_path=data["checkpoint_path"],
        checkpoint_name=data["checkpoint_name"],
        lineage=data.get("lineage") or {},
        scores=data.get("scores") or {},
        deployed_at=str(data.get("deployed_at") or ""),
    )


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {path} is not valid JSON: {e}") from e
    return parse_manifest(data, str(path))


def write_manifest(path: str | Path, *, checkpoint_path: str | Path, deployment_id: str,
                   model_id: str = DEFAULT_MODEL_ID, lineage: dict[str, Any] | None = None,
                   scores: dict[str, Any] | None = None, deployed_at: str | None = None) -> Manifest:
    """Write a manifest atomically (temporary file, fsync, rename) and return what was written."""
    path = Path(path)
    checkpoint = Path(checkpoint_path).resolve()
    manifest = Manifest(
        deployment_id=deployment_id,
        model_id=model_id,
        checkpoint_path=str(checkpoint),
        checkpoint_name=checkpoint.name,
        lineage=lineage or {},
        scores=scores or {},
        deployed_at=deployed_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    parse_manifest(manifest.to_json(), str(path))  # refuse to write what a reader would reject
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest
