"""The deployment manifest: the one contract between the pipeline and the server.

A manifest is a JSON file naming the checkpoint to serve, with its lineage, its benchmark
scores and why it was deployed. The pipeline writes manifests only through `write_manifest`
and the server reads them only through `read_manifest`, so both sides agree on one schema,
checked in one place. Writes replace the file whole (see `atomic_file`), so a server polling
the file sees the old deployment or the new one, never half of either.

    {"format": "nanogpt-pipeline/deployment", "format_version": 1,
     "deployment_id": "3f2a...", "model_id": "nanogpt",
     "checkpoint_path": "/abs/.../model_00599.pt", "checkpoint_name": "model_00599.pt",
     "source_asset": "finetuned_checkpoint",
     "lineage": {...},
     "scores": {"benchmark": "hellaswag", "acc": 0.29, "acc_norm": 0.30, "n": 10042, "candidates": {...}},
     "decision": {"kind": "gate", "reason": "...", "details": {...}},
     "deployed_at": "2025-01-01T00:00:00+00:00"}

`source_asset` and `decision` were added without a version bump: a reader that predates
them ignores them, and this reader accepts manifests without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nanogpt_core.atomic_file import write_text_atomically

FORMAT = "nanogpt-pipeline/deployment"
FORMAT_VERSION = 1
DEFAULT_MODEL_ID = "nanogpt"
CURRENT_MANIFEST_NAME = "current.json"

# Why a deployment happened: it won and passed the gate, an operator forced it past the
# gate, an operator rolled back to it, or it was written outside the pipeline.
DECISION_KINDS = ("gate", "forced", "rollback", "manual")


class ManifestError(ValueError):
    """A manifest that cannot be used, with the file and the field at fault in the message."""


@dataclass(frozen=True)
class Decision:
    kind: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    deployment_id: str
    model_id: str
    checkpoint_path: str
    checkpoint_name: str
    lineage: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    deployed_at: str = ""
    source_asset: str = ""
    decision: Decision | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.decision is None:
            del data["decision"]
        return data

    def score_on(self, benchmark: str) -> float | None:
        """This deployment's acc_norm on `benchmark`, or None when it was not scored on it."""
        if self.scores.get("benchmark") != benchmark:
            return None
        return self.scores.get("acc_norm")

    def redeployed(self, decision: Decision) -> Manifest:
        """The same deployment, deployed again now for the reason `decision` gives."""
        return dataclasses.replace(self, decision=decision, deployed_at=utc_now())


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_manifest(*, checkpoint_path: str | Path, deployment_id: str, model_id: str = DEFAULT_MODEL_ID,
                 source_asset: str = "", lineage: dict[str, Any] | None = None,
                 scores: dict[str, Any] | None = None, decision: Decision | None = None,
                 deployed_at: str | None = None) -> Manifest:
    """A validated manifest for `checkpoint_path` (made absolute), deployed now unless told otherwise."""
    checkpoint = Path(checkpoint_path).resolve()
    manifest = Manifest(deployment_id=deployment_id, model_id=model_id, checkpoint_path=str(checkpoint),
                        checkpoint_name=checkpoint.name, lineage=dict(lineage or {}), scores=dict(scores or {}),
                        deployed_at=deployed_at or utc_now(), source_asset=source_asset, decision=decision)
    return parse_manifest(json.loads(json.dumps(manifest.to_json())), "new manifest")


# ---------------------------------------------------------------------------------------------
# Validation: every message names the source and the field.


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ManifestError(f"{source}: {message}")


def _non_empty_string(data: dict, name: str, source: str) -> str:
    value = data.get(name)
    _require(isinstance(value, str) and bool(value), source, f"'{name}' must be a non-empty string, got {value!r}")
    return value


def _object(data: dict, name: str, source: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    _require(isinstance(value, dict), source, f"'{name}' must be an object, got {type(value).__name__}")
    return value


def _parse_scores(scores: dict[str, Any], source: str) -> dict[str, Any]:
    if "benchmark" in scores:
        _require(isinstance(scores["benchmark"], str) and bool(scores["benchmark"]), source,
                 f"'scores.benchmark' must be a non-empty string, got {scores['benchmark']!r}")
    for name in ("acc", "acc_norm"):
        if name in scores:
            value = scores[name]
            _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value) and 0.0 <= value <= 1.0,
                     source, f"'scores.{name}' must be a number in [0, 1], got {value!r}")
    if "n" in scores:
        _require(isinstance(scores["n"], int) and not isinstance(scores["n"], bool) and scores["n"] >= 0,
                 source, f"'scores.n' must be a count, got {scores['n']!r}")
    return scores


def _parse_decision(data: Any, source: str) -> Decision | None:
    if data is None:
        return None
    _require(isinstance(data, dict), source, f"'decision' must be an object, got {type(data).__name__}")
    kind = data.get("kind")
    _require(kind in DECISION_KINDS, source, f"'decision.kind' must be one of {', '.join(DECISION_KINDS)}, "
                                             f"got {kind!r}")
    reason = data.get("reason")
    _require(isinstance(reason, str) and bool(reason.strip()), source,
             f"'decision.reason' must say why (a non-empty string), got {reason!r}")
    details = data.get("details") or {}
    _require(isinstance(details, dict), source, "'decision.details' must be an object")
    return Decision(kind=kind, reason=reason, details=details)


def _parse_time(value: Any, source: str) -> str:
    if value in (None, ""):
        return ""
    _require(isinstance(value, str), source, f"'deployed_at' must be an ISO 8601 string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ManifestError(f"{source}: 'deployed_at' is not an ISO 8601 time: {value!r}") from None
    _require(parsed.tzinfo is not None, source, f"'deployed_at' must carry a time zone, got {value!r}")
    return value


def parse_manifest(data: Any, source: str = "manifest") -> Manifest:
    """Validate a manifest's decoded JSON; relative checkpoint paths are not accepted."""
    _require(isinstance(data, dict), source, f"expected a JSON object, got {type(data).__name__}")
    _require(data.get("format") == FORMAT, source, f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
    _require(data.get("format_version") == FORMAT_VERSION, source,
             f"'format_version' is {data.get('format_version')!r}; this code reads version {FORMAT_VERSION}")
    strings = {name: _non_empty_string(data, name, source)
               for name in ("deployment_id", "model_id", "checkpoint_path", "checkpoint_name")}
    _require(os.path.isabs(strings["checkpoint_path"]), source,
             f"'checkpoint_path' must be absolute, got {strings['checkpoint_path']!r}")
    _require(Path(strings["checkpoint_path"]).name == strings["checkpoint_name"], source,
             f"'checkpoint_name' {strings['checkpoint_name']!r} is not the file 'checkpoint_path' names")
    source_asset = data.get("source_asset") or ""
    _require(isinstance(source_asset, str), source, f"'source_asset' must be a string, got {source_asset!r}")
    return Manifest(**strings, lineage=_object(data, "lineage", source),
                    scores=_parse_scores(_object(data, "scores", source), source),
                    deployed_at=_parse_time(data.get("deployed_at"), source), source_asset=source_asset,
                    decision=_parse_decision(data.get("decision"), source))


# ---------------------------------------------------------------------------------------------
# Files


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


def write_manifest(path: str | Path, manifest: Manifest) -> Manifest:
    """Validate and write `manifest` atomically; what a reader would reject is never written."""
    path = Path(path)
    data = manifest.to_json()
    parse_manifest(json.loads(json.dumps(data)), str(path))
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return manifest
