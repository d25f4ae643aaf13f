"""Find what an upstream asset produced for this run: its folder and its data version.

An asset reads the upstream output materialized in its own run when there is one. Only
when the run did not materialize that upstream does it take an earlier output: the newest
one whose run has ended (or that no run made). Outputs of other runs still in flight are
never read, so two runs going at once (a sensor's and a schedule's, say) each train, gate
and deploy on what they built themselves. Which output was used is recorded on the asset's
materialization as `input_<upstream>` (data version, run, path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES

DATA_VERSION_TAG = "dagster/data_version"
# How many of an asset's latest materializations to look through for one made by a run that
# has ended; more runs than this materializing one asset at once is far beyond the run queue.
HISTORY_LIMIT = 50
THIS_RUN = "this run"
EARLIER_RUN = "an earlier run"


@dataclass(frozen=True)
class UpstreamOutput:
    asset: str
    path: Path
    data_version: str
    metadata: dict[str, Any]
    run_id: str = ""
    produced_in: str = THIS_RUN  # THIS_RUN or EARLIER_RUN

    def record(self) -> dict[str, str]:
        return {"data_version": self.data_version, "run_id": self.run_id, "produced_in": self.produced_in,
                "path": str(self.path)}


def latest_output(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext, asset: str) -> UpstreamOutput:
    """`asset`'s output for this run (see the module's docstring); it must carry a `path` in its metadata.

    An asset (not a check) also records the output it got in its own materialization's metadata.
    """
    key = dg.AssetKey(asset)
    run_id = context.run.run_id
    record, produced_in = _materialized_in_run(context.instance, run_id, key), THIS_RUN
    if record is None:
        record, produced_in = _newest_settled(context.instance, key, run_id, asset), EARLIER_RUN
    materialization = record.asset_materialization
    metadata = {k: value.value for k, value in materialization.metadata.items()}
    if "path" not in metadata:
        raise dg.Failure(f"the materialization of {asset} by run {record.run_id} records no path")
    path = Path(str(metadata["path"]))
    if not path.exists():
        raise dg.Failure(f"{asset}'s output {path} no longer exists; re-materialize {asset}")
    output = UpstreamOutput(asset, path, materialization.tags.get(DATA_VERSION_TAG, ""), metadata,
                            record.run_id, produced_in)
    if isinstance(context, dg.AssetExecutionContext):
        context.add_asset_metadata({f"input_{asset}": dg.MetadataValue.json(output.record())})
    context.log.info(f"using {asset} version {output.data_version} from {produced_in} ({record.run_id})")
    return output


def _materialized_in_run(instance: dg.DagsterInstance, run_id: str, key: dg.AssetKey) -> dg.EventLogEntry | None:
    """The newest materialization of `key` in run `run_id`, or None."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION,
                                           ascending=False).records
    for record in records:
        entry = record.event_log_entry
        if entry.dagster_event is not None and entry.dagster_event.asset_key == key:
            return entry
    return None


def _newest_settled(instance: dg.DagsterInstance, key: dg.AssetKey, run_id: str,
                    asset: str) -> dg.EventLogEntry:
    """The newest materialization of `key` whose run is no longer in flight."""
    records = instance.fetch_materializations(key, limit=HISTORY_LIMIT, ascending=False).records
    if not records:
        raise dg.Failure(f"{asset} has not been materialized yet; materialize it (or select it with this asset)")
    other_runs = {r.run_id for r in records if r.run_id and r.run_id != run_id}
    in_flight = {run.run_id for run in instance.get_runs(dg.RunsFilter(run_ids=list(other_runs),
                                                                       statuses=IN_PROGRESS_RUN_STATUSES))} \
        if other_runs else set()
    for record in records:
        if record.run_id not in in_flight:
            return record.event_log_entry
    raise dg.Failure(f"every recent output of {asset} comes from a run still in flight "
                     f"({', '.join(sorted(in_flight))}); wait for it to end, or select {asset} in this run")
