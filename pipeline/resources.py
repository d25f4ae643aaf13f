"""Resources: where artifacts live, and how training processes are launched."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import dagster as dg


class ArtifactStore(dg.ConfigurableResource):
    """One root folder for every asset's files: `<root>/<asset>/<data version>/...`.

    An asset builds in a scratch folder and renames it into place under its data version,
    so an old version stays readable after a new one lands, and a half-built version is
    never visible.
    """

    root: str = os.environ.get("NANOGPT_ARTIFACTS", "artifacts")

    def root_path(self) -> Path:
        return Path(self.root).resolve()

    def path(self, *parts: str) -> Path:
        return self.root_path().joinpath(*parts)

    def scratch(self, asset: str) -> Path:
        folder = self.path(".scratch", f"{asset}-{uuid.uuid4().hex[:12]}")
        folder.mkdir(parents=True)
        return folder

    def promote(self, scratch: Path, asset: str, version: str) -> Path:
        """Move a finished scratch folder to `<asset>/<version>`; identical content is kept once."""
        final = self.path(asset, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # same content hash: the existing copy is already this version
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, final)
        return final
