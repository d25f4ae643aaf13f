"""Rolling back from a shell: serve an earlier deployment again.

With DAGSTER_HOME set, so the run is recorded in the same instance as the UI's runs:

    python -m pipeline.rollback --list
    python -m pipeline.rollback 3f2a9c0d1e5b7a64 --reason "the new model answers in French"

This runs the `rollback_deployment` job (pipeline/rollback_job.py, also launched from the
Dagster UI) in this process, so it needs neither the webserver nor the daemon.
"""

from __future__ import annotations

import argparse
import sys

import dagster as dg

from pipeline.definitions import defs
from pipeline.deployment_store import read_current, recorded_deployments
from pipeline.resources import ArtifactStore
from pipeline.rollback_job import ROLLBACK_JOB


def list_deployments(artifacts: ArtifactStore) -> str:
    try:
        current = read_current(artifacts)
    except ValueError:
        current = None
    rows = []
    for m in recorded_deployments(artifacts):
        marker = "*" if current and m.deployment_id == current.deployment_id else " "
        score = f"{m.scores.get('acc_norm', float('nan')):.4f} {m.scores.get('benchmark', '')}"
        rows.append(f"{marker} {m.deployment_id}  {m.deployed_at}  {m.source_asset or '-':<22} {score:<20} "
                    f"{m.checkpoint_path}")
    return "\n".join(rows) or f"no deployments recorded under {artifacts.path('deployed_model')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rollback",
                                     description="Serve an earlier deployment again (DAGSTER_HOME must be set).")
    parser.add_argument("deployment_id", nargs="?", help="the deployment to serve again")
    parser.add_argument("--reason", default="", help="why; recorded in the manifest")
    parser.add_argument("--list", action="store_true", help="list recorded deployments (* marks the current one)")
    args = parser.parse_args(argv)
    artifacts = ArtifactStore()
    if args.list:
        print(list_deployments(artifacts))
        return 0
    if not args.deployment_id:
        parser.error("give a deployment id, or --list to see them")
    try:
        instance = dg.DagsterInstance.get()
    except dg.DagsterError as e:  # DAGSTER_HOME unset, or not a folder
        print(f"rollback: {e}", file=sys.stderr)
        return 2

    result = defs.resolve_job_def(ROLLBACK_JOB).execute_in_process(
        run_config={"deployment_id": args.deployment_id, "reason": args.reason},
        instance=instance, raise_on_error=False)
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure]
        message = failures[0].event_specific_data.error.message.strip() if failures else "the run failed"
        print(f"rollback failed (run {result.run_id}): {message}", file=sys.stderr)
        return 1
    current = read_current(artifacts)
    print(f"now serving deployment {current.deployment_id} ({current.checkpoint_path}); "
          f"run {result.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
