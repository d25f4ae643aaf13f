"""Scores for both checkpoints on one benchmark, and the deployment of the winner through the gate."""


import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from nanogpt_core.atomic_file import write_text_atomically
from nanogpt_core.checkpoint import CheckpointError, read_checkpoint
from nanogpt_core.config import PROFILES, get_run_profile
from nanogpt_core.deployment_manifest import Decision, Manifest, ManifestError, new_manifest
from nanogpt_core.eval.hellaswag import evaluate_checkpoint
from pipeline.config import SCORED_CHECKPOINTS, DeployConfig, EvalConfig
from pipeline.deployment_store import current_manifest_path, publish, read_current, read_record, record_path
from pipeline.gate import choose_winner, failed_checks, regression_refusal
from pipeline.resources import ArtifactStore
from pipeline.upstream import latest_output

EVAL_GROUP = "evaluation"
DEPLOY_GROUP = "deployment"
SCORES_IN_RANGE = "scores_in_range"
SCORE_CHECKS = (SCORES_IN_RANGE,)  # every one must have passed on the scores a deployment uses
# Each profile's number of examples to score; the values live in the profiles.
DEFAULT_LIMITS = {name: profile.evaluation.limit for name, profile in PROFILES.items()}


def choose_benchmark(config: EvalConfig) -> tuple[str, str | None]:
    """A given HellaSwag file is scored; otherwise "auto" means the profile's benchmark (for
    gpt2-124m HellaSwag, downloaded when reachable)."""
    data = config.data_path or os.environ.get("NANOGPT_HELLASWAG")
    if config.benchmark == "hellaswag" or (config.benchmark == "auto" and data):
        return "hellaswag", data
    if config.benchmark == "auto":
        return get_run_profile(config.profile).evaluation.benchmark, None
    return config.benchmark, None


@dg.asset(group_name=EVAL_GROUP, kinds={"pytorch"}, code_version="2", deps=list(SCORED_CHECKPOINTS),
          check_specs=[dg.AssetCheckSpec(SCORES_IN_RANGE, asset="hellaswag_scores", blocking=True,
                                         description="every accuracy lies in [0, 1] and n is as configured; "
                                                     "deployed_model refuses scores that failed it")],
          description="Both checkpoints scored on the same multiple-choice benchmark (HellaSwag, or the "
                      "offline demo cloze set), so they can be compared.")
def hellaswag_scores(context: dg.AssetExecutionContext, config: EvalConfig,
                     artifacts: ArtifactStore) -> dg.MaterializeResult:
    benchmark, data = choose_benchmark(config)
    limit = config.limit if config.limit is not None else DEFAULT_LIMITS.get(config.profile)
    scores = {}
    for asset in SCORED_CHECKPOINTS:
        upstream = latest_output(context, asset)
        result = evaluate_checkpoint(upstream.path, data, benchmark=benchmark, limit=limit)
        scores[asset] = {**result, "checkpoint": str(upstream.path), "checkpoint_data_version": upstream.data_version}
        context.log.info(f"{asset}: {benchmark} acc_norm {result['acc_norm']:.4f} (n={result['n']})")
    payload = {"benchmark": benchmark, "limit": limit, "scores": scores}
    version = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    path = artifacts.path("hellaswag_scores", version, "scores.json")
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True))

    in_range = all(0.0 <= s[k] <= 1.0 for s in scores.values() for k in ("acc", "acc_norm"))
    n_ok = all(limit is None or s["n"] == limit for s in scores.values())
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(path)), "benchmark": benchmark,
                  **{f"{a}_acc_norm": scores[a]["acc_norm"] for a in SCORED_CHECKPOINTS},
                  **{f"{a}_acc": scores[a]["acc"] for a in SCORED_CHECKPOINTS},
                  "n": min(s["n"] for s in scores.values())},
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(check_name=SCORES_IN_RANGE, passed=in_range and n_ok,
                                metadata={"n": min(s["n"] for s in scores.values()), "configured_n": limit,
                                          "accuracies_in_range": in_range}),
        ])


@dg.asset(group_name=DEPLOY_GROUP, kinds={"json"}, code_version="2", deps=[hellaswag_scores],
          description="The best eligible checkpoint, deployed through the gate: a deployment manifest the "
                      "server hot-swaps to. With rollback_to, an earlier deployment served again.")
def deployed_model(context: dg.AssetExecutionContext, config: DeployConfig,
                   artifacts: ArtifactStore) -> dg.MaterializeResult:
    if config.rollback_to:
        manifest = roll_back(config.rollback_to, config.reason, artifacts)
    else:
        manifest = deploy_winner(context, config, artifacts)
    publish(artifacts, manifest)
    context.log.info(f"deployed {manifest.checkpoint_path} as {manifest.model_id} "
                     f"({manifest.decision.kind}: {manifest.decision.reason})")
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(record_path(artifacts, manifest.deployment_id))),
                  "manifest": dg.MetadataValue.path(str(current_manifest_path(artifacts))),
                  "deployment_id": manifest.deployment_id,
                  "checkpoint": dg.MetadataValue.path(manifest.checkpoint_path), "model_id": manifest.model_id,
                  "source_asset": manifest.source_asset, "benchmark": manifest.scores.get("benchmark"),
                  "acc_norm": manifest.scores.get("acc_norm"), "decision": manifest.decision.kind,
                  "reason": manifest.decision.reason},
        data_version=dg.DataVersion(manifest.deployment_id))


def deploy_winner(context: dg.AssetExecutionContext, config: DeployConfig, artifacts: ArtifactStore) -> Manifest:
    """The winner's manifest, if it passes the gate or the deployment is forced; else the run fails."""
    scores_output = latest_output(context, "hellaswag_scores")
    evaluation = json.loads(scores_output.path.read_text())
    benchmark = evaluation["benchmark"]
    winner = choose_winner(evaluation, config.eligible)
    problems = failed_checks(context.instance, "hellaswag_scores", SCORE_CHECKS, scores_output.data_version,
                             scores_output.run_id)
    deployed = None
    try:
        deployed = read_current(artifacts)
    except ManifestError as e:
        problems.append(f"the deployed manifest cannot be read, so nothing can be compared: {e}")
    refusal = regression_refusal(benchmark, winner, deployed, config.max_regression)
    if refusal:
        problems.append(refusal)
    if problems and not config.force:
        raise dg.Failure(
            description="deployment refused: " + "; ".join(problems) + ". current.json is unchanged; to deploy "
                        "anyway, set force: true with a reason",
            metadata={"benchmark": benchmark, "candidate": winner.asset,
                      "candidate_acc_norm": winner.scores["acc_norm"],
                      "deployed_acc_norm": deployed.score_on(benchmark) if deployed else None,
                      "deployed_id": deployed.deployment_id if deployed else None,
                      "max_regression": config.max_regression})

    checkpoint = Path(winner.scores["checkpoint"])
    try:
        lineage = read_checkpoint(checkpoint)["lineage"]
    except CheckpointError as e:
        raise dg.Failure(f"cannot deploy {winner.asset}: {e}") from e
    details = {"max_regression": config.max_regression, "eligible": list(config.eligible),
               "replaced_deployment_id": deployed.deployment_id if deployed else None,
               "replaced_acc_norm": deployed.score_on(benchmark) if deployed else None}
    if config.force:
        decision = Decision("forced", config.reason,
                            {**details, "gate_problems": problems, "gate_reason": winner.reason})
    else:
        decision = Decision("gate", winner.reason, details)
    return new_manifest(
        checkpoint_path=checkpoint,
        deployment_id=hashlib.sha256(f"{checkpoint}:{scores_output.data_version}".encode()).hexdigest()[:16],
        model_id=config.model_id, source_asset=winner.asset,
        lineage={**lineage, "checkpoint_data_version": winner.scores["checkpoint_data_version"],
                 "scores_data_version": scores_output.data_version},
        scores={"benchmark": benchmark, "acc": winner.scores["acc"], "acc_norm": winner.scores["acc_norm"],
                "n": winner.scores["n"],
                "candidates": {a: {"acc": s["acc"], "acc_norm": s["acc_norm"], "eligible": a in config.eligible}
                               for a, s in evaluation["scores"].items()}},
        decision=decision)


def roll_back(deployment_id: str, reason: str | None, artifacts: ArtifactStore) -> Manifest:
    """An earlier deployment, deployed again as it was (same id, checkpoint and scores).

    The gate does not apply: a rollback is an operator's explicit choice of a model that was
    served before. Its checkpoint must still load, or the server would refuse the swap.
    """
    try:
        target = read_record(artifacts, deployment_id)
    except ManifestError as e:
        raise dg.Failure(f"cannot roll back: {e}") from e
    try:
        read_checkpoint(target.checkpoint_path)
    except CheckpointError as e:
        raise dg.Failure(f"cannot roll back to deployment {deployment_id}: {e}") from e
    try:
        current = read_current(artifacts)
    except ManifestError:
        current = None  # a broken current manifest is exactly what a rollback may be repairing
    replaced = current.deployment_id if current else None
    return target.redeployed(Decision(
        "rollback", reason or f"rolled back from {replaced} to {deployment_id}",
        {"replaced_deployment_id": replaced, "first_deployed_at": target.deployed_at,
         "first_decision": target.decision.kind if target.decision else None}))
