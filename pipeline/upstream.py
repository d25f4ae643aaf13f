"""Find what an upstream asset produced: its folder and its data version, from the instance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

DATA_VERSION_TAG = "dagster/data_version"


@dataclass(frozen=True)
class UpstreamOutput:
    asset: str
    path: Path
    data_version: str
    metadata: dict[str, Any]


def latest_output(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, asset: str) -> UpstreamOutput:
    """The newest materialization of `asset`, which must carry a `path` in its metadata."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        raise dg.Failure(f"{asset} has not been materialized yet; materialize it (or select it with this asset)")
    materialization = event.asset_materialization
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    if "path" not in metadata:
        raise dg.Failure(f"the latest materialization of {asset} records no path")
    path = Path(str(metadata["path"]))
    if not path.exists():
        raise dg.Failure(f"{asset}'s output {path} no longer exists; re-materialize {asset}")
    return UpstreamOutput(asset, path, materialization.tags.get(DATA_VERSION_TAG, ""), metadata)
