"""Retraining when new text arrives in the incoming folder, and weekly.

Both start the same `retrain` job with the same config (pipeline.incoming): it rebuilds the
raw text and shards from the folder, trains, fine-tunes, scores, and deploys only through the
gate in `deployed_model`. docs/ARCHITECTURE.md says why this is a sensor rather than
declarative automation.
"""

import os

import dagster as dg

from nanogpt_core.data.folder_source import FileHashCache, scan_folder
from nanogpt_core.data.text_sources import TextSourceError
from pipeline.incoming import FOLDER_HASH_METADATA, RETRAIN_JOB, incoming_folder, retraining_request
from pipeline.resources import ArtifactStore

# Seconds between the sensor's looks at the folder. A look lists the folder and reads only the
# files that changed since the last look (by their stat signature; see folder_source), so its
# cost grows with the number of files, not their bytes, once they have been hashed.
POLL_ENV = "NANOGPT_INCOMING_POLL_S"
POLL_SECONDS = int(os.environ.get(POLL_ENV, "30"))

# The sensor runs in the code server's long-lived process, so the cache lasts from tick to tick;
# after a restart the first look reads everything once.
SENSOR_HASH_CACHE = FileHashCache()

retrain_job = dg.define_asset_job(
    RETRAIN_JOB, selection=dg.AssetSelection.assets("raw_fineweb", "dolly_prompts").downstream(),
    description="Rebuild the data from the incoming text folder, train, fine-tune, score, and deploy "
                "the winner if it passes the gate.")


def last_read_content_hash(instance: dg.DagsterInstance) -> str | None:
    """The folder content the newest raw_fineweb was built from, if it was built from a folder."""
    event = instance.get_latest_materialization_event(dg.AssetKey("raw_fineweb"))
    materialization = event.asset_materialization if event else None
    value = materialization.metadata.get(FOLDER_HASH_METADATA) if materialization else None
    return str(value.value) if value is not None else None


@dg.sensor(job=retrain_job, name="new_incoming_text", minimum_interval_seconds=POLL_SECONDS,
           default_status=dg.DefaultSensorStatus.STOPPED,
           description="Retrains when the content of the incoming text folder changes (by content hash, "
                       "not modification time).")
def new_incoming_text(context: dg.SensorEvaluationContext, artifacts: ArtifactStore):
    folder = incoming_folder(artifacts)
    try:
        snapshot = scan_folder(folder, SENSOR_HASH_CACHE)
    except TextSourceError as e:
        return dg.SkipReason(str(e))
    if snapshot.content_hash == context.cursor:
        return dg.SkipReason(f"no new text in {folder} (content {snapshot.content_hash[:12]})")
    if context.cursor is None and snapshot.content_hash == last_read_content_hash(context.instance):
        # Switched on over text that was already trained on: wait for the next change.
        return dg.SensorResult(skip_reason=f"{folder} holds the text raw_fineweb was last built from",
                               cursor=snapshot.content_hash)
    # The run key makes a second request for the same content a no-op, should the cursor be lost.
    return dg.SensorResult(run_requests=[retraining_request(snapshot, "sensor", run_key=snapshot.content_hash)],
                           cursor=snapshot.content_hash)


@dg.schedule(job=retrain_job, cron_schedule="0 3 * * 1", name="weekly_retraining",  # Mondays 03:00
             default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Weekly retraining on the incoming text folder; off until switched on in the UI.")
def weekly_retraining(context: dg.ScheduleEvaluationContext, artifacts: ArtifactStore):
    try:
        snapshot = scan_folder(incoming_folder(artifacts))
    except TextSourceError as e:
        return dg.SkipReason(str(e))
    return retraining_request(snapshot, "schedule")
