"""Scheduled retraining, and re-tokenization when new raw text lands."""


import dagster as dg

from pipeline.upstream import DATA_VERSION_TAG

retrain_job = dg.define_asset_job(
    "retrain", selection=dg.AssetSelection.all(),
    description="Re-materialize data, both checkpoints, their scores and the deployment.")

retokenize_job = dg.define_asset_job(
    "retokenize_downstream", selection=dg.AssetSelection.assets("token_shards").downstream(),
    description="Rebuild the token shards from the newest raw text, and everything that depends on them.")

weekly_retraining = dg.ScheduleDefinition(
    name="weekly_retraining", job=retrain_job, cron_schedule="0 3 * * 1",  # Mondays 03:00
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Weekly retraining from fresh data; off until switched on in the UI.")


@dg.asset_sensor(asset_key=dg.AssetKey("raw_fineweb"), job=retokenize_job, name="new_raw_text",
                 default_status=dg.DefaultSensorStatus.STOPPED, minimum_interval_seconds=60,
                 description="When raw_fineweb lands with content the shards were not built from, "
                             "rebuild the shards and everything downstream.")
def new_raw_text(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
    materialization = asset_event.asset_materialization
    raw_version = materialization.tags.get(DATA_VERSION_TAG) if materialization else None
    shards_event = context.instance.get_latest_materialization_event(dg.AssetKey("token_shards"))
    built_from = None
    if shards_event and shards_event.asset_materialization:
        built_from = shards_event.asset_materialization.metadata.get("raw_data_version")
        built_from = built_from.value if built_from is not None else None
    if raw_version is None or raw_version == built_from:
        return dg.SkipReason(f"token_shards already built from raw data version {raw_version}")
    return dg.RunRequest(run_key=f"raw-{raw_version}")
