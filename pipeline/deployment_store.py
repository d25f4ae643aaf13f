"""Where deployments live in the artifacts tree.

    deployment/current.json              the manifest the server follows: the deployment served now
    deployed_model/<id>/deployment.json  one record per deployment, as first deployed; what a
                                         rollback redeploys and what retention keeps checkpoints for

Every file here is written and read through `nanogpt_core.deployment_manifest`.
"""

from __future__ import annotations

from pathlib import Path

from nanogpt_core.deployment_manifest import (CURRENT_MANIFEST_NAME, Manifest, ManifestError, read_manifest,
                                              write_manifest)
from pipeline.resources import ArtifactStore

RECORDS_ASSET = "deployed_model"
RECORD_NAME = "deployment.json"


def current_manifest_path(artifacts: ArtifactStore) -> Path:
    return artifacts.path("deployment", CURRENT_MANIFEST_NAME)


def record_path(artifacts: ArtifactStore, deployment_id: str) -> Path:
    return artifacts.path(RECORDS_ASSET, deployment_id, RECORD_NAME)


def read_current(artifacts: ArtifactStore) -> Manifest | None:
    """The deployment served now; None before the first. An unreadable file raises ManifestError."""
    path = current_manifest_path(artifacts)
    return read_manifest(path) if path.exists() else None


def read_record(artifacts: ArtifactStore, deployment_id: str) -> Manifest:
    path = record_path(artifacts, deployment_id)
    if not path.exists():
        known = ", ".join(m.deployment_id for m in recorded_deployments(artifacts)) or "none"
        raise ManifestError(f"no deployment {deployment_id!r} is recorded under {path.parent.parent} "
                            f"(recorded: {known})")
    return read_manifest(path)


def recorded_deployments(artifacts: ArtifactStore) -> list[Manifest]:
    """Every readable deployment record, newest first; unreadable ones are left out."""
    found = []
    for path in sorted(artifacts.path(RECORDS_ASSET).glob(f"*/{RECORD_NAME}")):
        try:
            found.append(read_manifest(path))
        except ManifestError:
            continue
    return sorted(found, key=lambda m: m.deployed_at, reverse=True)


def publish(artifacts: ArtifactStore, manifest: Manifest) -> Path:
    """Record a new deployment (once per id) and make it the one served."""
    record = record_path(artifacts, manifest.deployment_id)
    if not record.exists():
        write_manifest(record, manifest)
    write_manifest(current_manifest_path(artifacts), manifest)
    return record
