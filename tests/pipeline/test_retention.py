"""Retention on a real artifacts tree: four pretrained versions from four real trainings, two of
them deployed or recorded, plus what failed materializations and saves leave behind."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from nanogpt_core.checkpoint import read_checkpoint, save_checkpoint
from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.deployment_manifest import Decision, new_manifest
from pipeline.deployment_store import publish
from pipeline.resources import ArtifactStore
from pipeline.retention import RetentionConfig, cleanup_artifacts, plan_cleanup

from .conftest import latest_event, materialize

DAY = 24 * 3600
STEPS = (3, 4, 5, 6)  # one pretrained version each, oldest first


def make_old(path: Path, age_s: float = 2 * DAY) -> Path:
    then = time.time() - age_s
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then))
    return path


class FailsToSave:
    """A value whose serialization fails halfway through the file, as a full disk would."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_save_leaves_no_temporary_file(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "model_00001.pt", model, step=1, metrics={"value": FailsToSave()})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention") / "artifacts"
    with dg.instance_for_test() as instance:
        versions = []
        for steps in STEPS:
            selection = ["raw_fineweb", "token_shards", "pretrained_checkpoint"] if not versions \
                else ["pretrained_checkpoint"]
            # One process per torchrun: retention needs versions, not DDP, and it halves the time.
            result = materialize(selection, instance, root,
                                 pretrained_checkpoint={"max_steps": steps, "nproc_per_node": 1})
            assert result.success
            versions.append(Path(latest_event(instance, "pretrained_checkpoint").metadata["path"].value))
        artifacts = ArtifactStore(root=str(root))
        # The oldest version was deployed once (its record is kept); the second is served now.
        for deployment_id, checkpoint, at in (("first", versions[0], "2025-01-01T00:00:00+00:00"),
                                              ("now", versions[1], None)):
            publish(artifacts, new_manifest(checkpoint_path=checkpoint, deployment_id=deployment_id, deployed_at=at,
                                            decision=Decision("manual", "test deployment")))
        yield instance, artifacts, versions


def leftovers(root: Path) -> dict[str, Path]:
    """What failures leave behind, stale and fresh."""
    made = {
        "stale scratch": root / ".scratch" / f"token_shards-{uuid.uuid4().hex[:12]}" / "part.bin",
        "fresh scratch": root / ".scratch" / f"hf_export-{uuid.uuid4().hex[:12]}" / "part.bin",
        "stale training scratch": root / ".scratch" / f"pretrained_checkpoint-{uuid.uuid4().hex[:12]}" / "x.bin",
        "stale tmp": root / "deployment" / ".current.json.k2j3.tmp",
        "fresh tmp": root / "token_shards" / "half_written.bin.tmp",
    }
    for path in made.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    for name, path in made.items():
        if name.startswith("stale"):
            make_old(path.parent if path.parent.parent.name == ".scratch" else path)
    return {name: (p.parent if p.parent.parent.name == ".scratch" else p) for name, p in made.items()}


def clean(instance, artifacts: ArtifactStore, **config) -> dict:
    job = dg.Definitions(jobs=[cleanup_artifacts], resources={"artifacts": artifacts}).resolve_job_def(
        cleanup_artifacts.name)
    result = job.execute_in_process(run_config={"ops": {"clean_artifacts": {"config": config}}}, instance=instance)
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_the_deployed_recorded_and_newest_survive_the_rest_goes_and_a_dry_run_only_lists(tree):
    instance, artifacts, versions = tree
    root = artifacts.root_path()
    left = leftovers(root)
    runs = sorted((root / "pretrained_checkpoint" / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert len(runs) == len(STEPS)

    # While a run that trains pretrained_checkpoint is in progress, its run folders, scratch
    # folders and temporary files are not touched.
    active = instance.add_run(dg.DagsterRun(job_name="retrain", run_id=str(uuid.uuid4()),
                                            status=dg.DagsterRunStatus.STARTED,
                                            asset_selection=frozenset({dg.AssetKey("pretrained_checkpoint")})))
    during = clean(instance, artifacts, keep_per_asset=1, dry_run=True)
    instance.delete_run(active.run_id)
    assert during["active_runs"] == 1
    in_use = ("pretrained_checkpoint/runs", ".scratch/pretrained_checkpoint")
    assert not any(p.startswith(in_use) for p in during["paths"])

    # A dry run lists what would go and removes nothing.
    before = snapshot(root)
    dry = clean(instance, artifacts, keep_per_asset=1, dry_run=True)
    assert snapshot(root) == before
    expected = {
        str(versions[2].parent.relative_to(root)),  # neither newest, deployed nor recorded
        *(str(run.relative_to(root)) for run in runs[:-1]),  # all run folders but the newest
        str(left["stale scratch"].relative_to(root)), str(left["stale training scratch"].relative_to(root)),
        str(left["stale tmp"].relative_to(root)),
    }
    assert set(dry["paths"]) == expected and dry["would_remove"] == len(expected) and dry["bytes_to_free"] > 0

    # The real run removes exactly that.
    done = clean(instance, artifacts, keep_per_asset=1)
    assert set(done["paths"]) == expected and done["removed"] == len(expected)
    assert snapshot(root) == {p for p in before if not any(p == e or p.startswith(e + "/") for e in expected)}
    for kept in (versions[0], versions[1], versions[3]):  # recorded, deployed, newest
        assert read_checkpoint(kept)["step"] >= 0
    assert runs[-1].is_dir() and left["fresh scratch"].is_dir() and left["fresh tmp"].is_file()
    assert (root / "deployed_model" / "first" / "deployment.json").is_file()

    # Dropping the older deployment record from the kept ones lets its checkpoint go too.
    plan = plan_cleanup(artifacts, RetentionConfig(keep_per_asset=1, keep_deployments=1))
    assert {r.path for r in plan.remove} == {root / "deployed_model" / "first", versions[0].parent}
