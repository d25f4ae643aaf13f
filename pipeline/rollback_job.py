"""The `rollback_deployment` job: serve an earlier deployment again, from the Dagster UI.

Launch it with

    deployment_id: 3f2a9c0d1e5b7a64      # from deployed_model's materializations
    reason: the new model answers in French

It materializes `deployed_model` with `rollback_to`, which rewrites `deployment/current.json`
through the manifest module with the earlier deployment's id, checkpoint and scores; a running
server swaps back within its poll interval. `python -m pipeline.rollback` runs the same job
from a shell.
"""

from __future__ import annotations

import dagster as dg

ROLLBACK_JOB = "rollback_deployment"


@dg.config_mapping(config_schema={
    "deployment_id": dg.Field(str, description="the earlier deployment to serve again (deployed_model/<id>/)"),
    "reason": dg.Field(str, is_required=False, default_value="", description="why; recorded in the manifest"),
})
def rollback_run_config(values: dict) -> dict:
    return {"ops": {"deployed_model": {"config": {"rollback_to": values["deployment_id"],
                                                  "reason": values["reason"] or None}}}}


rollback_job = dg.define_asset_job(
    ROLLBACK_JOB, selection=dg.AssetSelection.assets("deployed_model"), config=rollback_run_config,
    description="Serve an earlier deployment again: deployed_model rewritten from its record, gate skipped, "
                "the rollback and its reason recorded in the manifest.")
