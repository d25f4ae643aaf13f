"""The folder people drop new pretraining text into, and the retraining run that reads it.

The folder is `$NANOGPT_INCOMING` when set, else `incoming/` under the artifacts root. The
sensor and the weekly schedule both ask for the same run, built here, so a run started by
either (or by hand with the same config) is the same job reading the same folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from nanogpt_core.data.folder_source import FolderSnapshot
from pipeline.resources import ArtifactStore

INCOMING_ENV = "NANOGPT_INCOMING"
RETRAIN_JOB = "retrain"
FOLDER_HASH_TAG = "nanogpt/incoming_content_hash"  # on a run: the content it was started for
FOLDER_HASH_METADATA = "folder_content_hash"  # on raw_fineweb: the content it read
TRIGGER_TAG = "nanogpt/trigger"


def incoming_folder(artifacts: ArtifactStore) -> Path:
    configured = os.environ.get(INCOMING_ENV)
    return Path(configured).resolve() if configured else artifacts.path("incoming")


def retraining_request(snapshot: FolderSnapshot, trigger: str, run_key: str | None = None) -> dg.RunRequest:
    """Retrain on the folder as scanned: the run reads that folder, and its tags name the content
    it was started for (the run records what it actually read on `raw_fineweb`)."""
    return dg.RunRequest(
        run_key=run_key,
        run_config={"ops": {"raw_fineweb": {"config": {"source": "folder", "path": str(snapshot.folder)}}}},
        tags={FOLDER_HASH_TAG: snapshot.content_hash, TRIGGER_TAG: trigger})
