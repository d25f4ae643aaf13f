"""Retention: what the artifacts tree may lose, so that disks do not fill over months of runs.

Kept, whatever their age:
- the deployed checkpoint (`deployment/current.json`), and every checkpoint a kept deployment
  record names (the newest `keep_deployments` records under `deployed_model/`);
- the newest `keep_per_asset` published versions and run folders of each training asset;
- anything a run still in progress may use: every version materialized since the oldest such
  run started plus the one that was newest then, and all run folders, scratch folders and
  temporary files of the assets such a run materializes.

Removed: older published versions and run folders of the training assets, deployment records
beyond the kept ones, `.scratch/` folders of failed assets and `*.tmp` files of failed saves
once they are `stale_after_hours` old. Other assets' folders (data, scores, exports) are left
alone. `plan_cleanup` decides from the files alone; the job adds what only the Dagster
instance knows (materialization times, runs in progress).
"""


import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from pydantic import Field

from nanogpt_core.deployment_manifest import ManifestError
from pipeline.config import SCORED_CHECKPOINTS as CHECKPOINT_ASSETS
from pipeline.deployment_store import RECORDS_ASSET, read_current, recorded_deployments
from pipeline.resources import ArtifactStore

RUNS_FOLDER = "runs"
SCRATCH_FOLDER = ".scratch"


class RetentionConfig(dg.Config):
    keep_per_asset: int = Field(3, ge=1, description="newest published checkpoints (and run folders) kept per "
                                                     "training asset")
    keep_deployments: int = Field(10, ge=1, description="newest deployment records kept, with their checkpoints")
    stale_after_hours: float = Field(24.0, ge=0.0, description="age after which .scratch folders and *.tmp files "
                                                               "count as left over from a failure")
    dry_run: bool = Field(False, description="list what would be removed and remove nothing")


@dataclass(frozen=True)
class Removal:
    path: Path
    why: str
    size: int


@dataclass
class CleanupPlan:
    remove: list[Removal] = field(default_factory=list)
    keep: dict[Path, str] = field(default_factory=dict)  # what was a candidate for removal, and why it stays

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.remove)


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def newest_mtime(path: Path) -> float:
    times = [path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*") if not p.is_symlink())]
    return max(times)


def holds_any(folder: Path, paths: Iterable[Path]) -> bool:
    return any(p == folder or folder in p.parents for p in paths)


def plan_cleanup(artifacts: ArtifactStore, config: RetentionConfig, *, protected: Iterable[Path] = (),
                 busy_assets: Iterable[str] = (), recency: dict[Path, float] | None = None,
                 now: float | None = None) -> CleanupPlan:
    """What to remove from the artifacts tree. `protected`: paths in use, kept with the folders
    holding them; `busy_assets`: assets a run in progress materializes; `recency`: when each
    folder was last materialized (folders missing from it go by their newest file's time)."""
    root = artifacts.root_path()
    now = time.time() if now is None else now
    busy = set(busy_assets)
    recency = recency or {}
    plan = CleanupPlan()
    protected = [Path(p).resolve() for p in protected]

    records = recorded_deployments(artifacts)
    try:
        current = read_current(artifacts)
    except ManifestError:
        current = None  # unreadable: nothing to add, and the records still protect their checkpoints
    kept_records = records[:config.keep_deployments]
    if current is not None:
        protected.append(Path(current.checkpoint_path))
    protected += [Path(m.checkpoint_path) for m in kept_records]
    kept_ids = {m.deployment_id for m in kept_records} | ({current.deployment_id} if current else set())
    for manifest in records:
        folder = root / RECORDS_ASSET / manifest.deployment_id
        if manifest.deployment_id in kept_ids:
            plan.keep[folder] = "deployed now" if current and manifest.deployment_id == current.deployment_id \
                else f"one of the newest {config.keep_deployments} deployments"
        else:
            plan.remove.append(Removal(folder, f"deployment record older than the newest "
                                               f"{config.keep_deployments}", tree_size(folder)))

    for asset in CHECKPOINT_ASSETS:
        asset_root = root / asset
        if not asset_root.is_dir():
            continue
        versions = [p for p in asset_root.iterdir() if p.is_dir() and p.name != RUNS_FOLDER]
        runs = [p for p in (asset_root / RUNS_FOLDER).iterdir() if p.is_dir()] \
            if (asset_root / RUNS_FOLDER).is_dir() else []
        for kind, folders in (("published version", versions), ("run folder", runs)):
            if kind == "run folder" and asset in busy:
                plan.keep.update({f: f"{asset} is being materialized by a run in progress" for f in folders})
                continue
            ranked = sorted(folders, key=lambda f: recency.get(f) or newest_mtime(f), reverse=True)
            for rank, folder in enumerate(ranked):
                if rank < config.keep_per_asset:
                    plan.keep[folder] = f"one of the newest {config.keep_per_asset} of {asset}"
                elif holds_any(folder, protected):
                    plan.keep[folder] = "holds a deployed, recorded or in-use checkpoint"
                else:
                    plan.remove.append(Removal(folder, f"{kind} of {asset} beyond the newest "
                                                       f"{config.keep_per_asset}", tree_size(folder)))

    stale_before = now - config.stale_after_hours * 3600
    doomed = [r.path for r in plan.remove]
    scratch = root / SCRATCH_FOLDER
    for folder in sorted(scratch.iterdir()) if scratch.is_dir() else []:
        asset = folder.name.rsplit("-", 1)[0]
        if asset in busy:
            plan.keep[folder] = f"{asset} is being materialized by a run in progress"
        elif newest_mtime(folder) >= stale_before:
            plan.keep[folder] = f"younger than {config.stale_after_hours} h"
        else:
            plan.remove.append(Removal(folder, "scratch folder of a failed materialization", tree_size(folder)))
            doomed.append(folder)
    for tmp in sorted(root.rglob("*.tmp")):
        top = tmp.relative_to(root).parts[0]
        if holds_any(tmp, doomed) or not tmp.is_file():
            continue
        if top in busy:
            plan.keep[tmp] = f"{top} is being materialized by a run in progress"
        elif tmp.stat().st_mtime >= stale_before:
            plan.keep[tmp] = f"younger than {config.stale_after_hours} h"
        else:
            plan.remove.append(Removal(tmp, "temporary file of a failed save", tmp.stat().st_size))
    return plan


def apply(plan: CleanupPlan) -> None:
    for removal in plan.remove:
        if removal.path.is_dir() and not removal.path.is_symlink():
            shutil.rmtree(removal.path, ignore_errors=True)
        else:
            removal.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# What only the instance knows


ACTIVE_STATUSES = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                   dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
HISTORY_LIMIT = 1000


def active_runs(instance: dg.DagsterInstance, own_run_id: str) -> list[dg.DagsterRun]:
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE_STATUSES))
    return [r for r in runs if r.run_id != own_run_id]


def materialized_folders(instance: dg.DagsterInstance, asset: str) -> list[tuple[Path, float]]:
    """(folder of the materialized path, time), newest first, for `asset`'s materializations."""
    found = []
    for record in instance.fetch_materializations(dg.AssetKey(asset), limit=HISTORY_LIMIT).records:
        materialization = record.asset_materialization
        path = materialization.metadata.get("path") if materialization else None
        if path is not None:
            found.append((Path(str(path.value)).resolve().parent, record.timestamp))
    return found


def read_by_runs(instance: dg.DagsterInstance, runs: list[dg.DagsterRun]) -> list[Path]:
    """Checkpoint folders an active run may be reading.

    A run reads the newest version of its inputs when its step starts, so everything
    materialized since the oldest active run was created, and the version that was newest
    then, may be in use.
    """
    records = [instance.get_run_record_by_id(r.run_id) for r in runs]
    created = [record.create_timestamp.timestamp() for record in records if record is not None]
    if not created:
        return []
    oldest = min(created)
    folders: list[Path] = []
    for asset in CHECKPOINT_ASSETS:
        history = materialized_folders(instance, asset)
        folders += [folder for folder, at in history if at >= oldest]
        folders += [folder for folder, at in history if at < oldest][:1]
    return folders


def materialized_by_runs(runs: list[dg.DagsterRun], every_asset: set[str]) -> set[str]:
    """The assets active runs materialize; a run that names no selection may materialize any."""
    busy: set[str] = set()
    for run in runs:
        busy |= {key.to_user_string() for key in run.asset_selection} if run.asset_selection else every_asset
    return busy


@dg.op(out=dg.Out(dg.Nothing), description="Remove artifacts nothing needs; see pipeline/retention.py")
def clean_artifacts(context: dg.OpExecutionContext, config: RetentionConfig, artifacts: ArtifactStore) -> None:
    runs = active_runs(context.instance, context.run_id)
    root = artifacts.root_path()
    every_asset = {p.name for p in root.iterdir()} | set(CHECKPOINT_ASSETS) if root.is_dir() else set()
    busy = materialized_by_runs(runs, every_asset)
    recency: dict[Path, float] = {}
    for asset in CHECKPOINT_ASSETS:
        for folder, at in materialized_folders(context.instance, asset):
            recency[folder] = max(recency.get(folder, 0.0), at)
    plan = plan_cleanup(artifacts, config, protected=read_by_runs(context.instance, runs), busy_assets=busy,
                        recency=recency)
    verb = "would remove" if config.dry_run else "removing"
    for removal in plan.remove:
        context.log.info(f"{verb} {removal.path} ({removal.size:,} bytes): {removal.why}")
    if not config.dry_run:
        apply(plan)
    context.add_output_metadata({
        "dry_run": config.dry_run,
        "removed" if not config.dry_run else "would_remove": len(plan.remove),
        "bytes_freed" if not config.dry_run else "bytes_to_free": plan.bytes,
        "active_runs": len(runs),
        "paths": dg.MetadataValue.json(sorted(os.path.relpath(r.path, root) for r in plan.remove)),
        "removals": dg.MetadataValue.md("\n".join(
            ["| path | bytes | why |", "| --- | ---: | --- |",
             *(f"| {os.path.relpath(r.path, root)} | {r.size:,} | {r.why} |" for r in plan.remove)])),
        "kept": dg.MetadataValue.md("\n".join(
            ["| path | why |", "| --- | --- |",
             *(f"| {os.path.relpath(p, root)} | {why} |" for p, why in sorted(plan.keep.items()))])),
    })


@dg.job(description="Remove old checkpoints, run folders, deployment records, stale .scratch folders and *.tmp "
                    "files, keeping what is deployed, recorded or in use (dry_run lists only).")
def cleanup_artifacts():
    clean_artifacts()


nightly_cleanup = dg.ScheduleDefinition(
    name="nightly_cleanup", job=cleanup_artifacts, cron_schedule="30 4 * * *",  # daily 04:30
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Daily artifact retention; off until switched on in the UI.")
