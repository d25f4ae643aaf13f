"""The deployment gate: which scored checkpoint may be deployed, and when a deployment is refused.

The gate lives inside `deployed_model` rather than only in a blocking check, because a
blocking check stops downstream assets in its own run only: `deployed_model` materialized on
its own would otherwise deploy whatever was scored last. So the asset itself re-reads the
evaluations of the scores it is about to use, and compares the winner with what is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg

from nanogpt_core.deployment_manifest import Manifest
from pipeline.upstream import DATA_VERSION_TAG

# How far back to look for the materialization and check evaluations of the scores in use;
# far more than the number of evaluations between two deployments.
HISTORY_LIMIT = 100


@dataclass(frozen=True)
class Winner:
    asset: str
    scores: dict[str, Any]  # acc, acc_norm, n, checkpoint, checkpoint_data_version
    reason: str


def choose_winner(evaluation: dict[str, Any], eligible: list[str]) -> Winner:
    """The best eligible checkpoint by acc_norm; on a tie the one listed first in `eligible`."""
    scored = evaluation["scores"]
    benchmark = evaluation["benchmark"]
    missing = [asset for asset in eligible if asset not in scored]
    if missing:
        raise dg.Failure(f"the scores name no {', '.join(missing)}; scored: {', '.join(scored)}")
    best = max(eligible, key=lambda asset: (scored[asset]["acc_norm"], -eligible.index(asset)))
    s = scored[best]
    reason = (f"{best} scored acc_norm {s['acc_norm']:.4f} on {benchmark} (n={s['n']}), the best of the "
              f"eligible checkpoints ({', '.join(eligible)})")
    references = [f"{asset} {scored[asset]['acc_norm']:.4f}" for asset in scored if asset not in eligible]
    if references:
        reason += f"; not eligible, kept for reference: {', '.join(references)}"
    return Winner(best, s, reason)


def regression_refusal(benchmark: str, candidate: Winner, deployed: Manifest | None,
                       max_regression: float) -> str | None:
    """Why the candidate may not replace the deployed model, or None when it may."""
    deployed_score = deployed.score_on(benchmark) if deployed is not None else None
    if deployed_score is None:
        return None  # first deployment, or the deployed model was never scored on this benchmark
    score = candidate.scores["acc_norm"]
    if score >= deployed_score - max_regression:
        return None
    return (f"{candidate.asset} scores acc_norm {score:.4f} on {benchmark}, worse than the deployed model "
            f"({deployed.deployment_id}, {deployed.checkpoint_name}) at {deployed_score:.4f} by "
            f"{deployed_score - score:.4f}, more than max_regression {max_regression:.4f}")


def failed_checks(instance: dg.DagsterInstance, asset: str, check_names: tuple[str, ...],
                  data_version: str, run_id: str) -> list[str]:
    """What is wrong with the check evaluations of the `asset` materialization that run `run_id`
    made with `data_version`: a check that failed, or one never evaluated on it. Empty when all passed."""
    key = dg.AssetKey(asset)
    records = instance.fetch_materializations(key, limit=HISTORY_LIMIT).records
    storage_ids = {r.storage_id for r in records
                   if r.run_id == run_id and r.asset_materialization is not None
                   and r.asset_materialization.tags.get(DATA_VERSION_TAG) == data_version}
    problems = []
    for name in check_names:
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(key, name), limit=HISTORY_LIMIT)
        # Only finished evaluations: a check still running in another run is recorded as
        # planned (AssetCheckEvaluationPlanned), which targets no materialization yet.
        evaluations = [r.evaluation for r in history if isinstance(r.evaluation, dg.AssetCheckEvaluation)
                       and r.evaluation.target_materialization_data is not None
                       and r.evaluation.target_materialization_data.storage_id in storage_ids]
        if not evaluations:
            problems.append(f"check {name} was never evaluated on {asset} version {data_version} "
                            f"(materialize {asset} with its checks)")
        elif not evaluations[0].passed:
            detail = ", ".join(f"{k}={v.value}" for k, v in evaluations[0].metadata.items())
            problems.append(f"check {name} failed on {asset} version {data_version} ({detail})")
    return problems
