"""The Dagster code location: `dagster dev -w workspace.yaml` or `-m pipeline.definitions`."""

from __future__ import annotations

import dagster as dg

from pipeline.assets.data import dolly_prompts, raw_fineweb, token_shards
from pipeline.assets.deployment import deployed_model, hellaswag_scores
from pipeline.assets.export import hf_export
from pipeline.assets.training import finetuned_checkpoint, pretrained_checkpoint
from pipeline.automation import new_incoming_text, retrain_job, weekly_retraining
from pipeline.checks import dolly_prompts_are_valid, shards_are_valid
from pipeline.executor import step_executor
from pipeline.pipes_messages import training_pipes_client
from pipeline.resources import ArtifactStore
from pipeline.retention import cleanup_artifacts, nightly_cleanup
from pipeline.rollback_job import rollback_job

defs = dg.Definitions(
    assets=[raw_fineweb, token_shards, dolly_prompts, pretrained_checkpoint, finetuned_checkpoint,
            hellaswag_scores, deployed_model, hf_export],
    asset_checks=[shards_are_valid, dolly_prompts_are_valid],
    jobs=[retrain_job, rollback_job, cleanup_artifacts],
    schedules=[weekly_retraining, nightly_cleanup],
    sensors=[new_incoming_text],
    executor=step_executor,
    resources={
        "artifacts": ArtifactStore(),
        "pipes_subprocess_client": training_pipes_client(),
    },
)
