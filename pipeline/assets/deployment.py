"""Scores for both checkpoints on one benchmark, and the deployment of the winner."""


import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from nanogpt_core.checkpoint import read_checkpoint
from nanogpt_core.eval.hellaswag import evaluate_checkpoint
from pipeline.config import DeployConfig, EvalConfig
from pipeline.resources import ArtifactStore
from pipeline.upstream import latest_output

EVAL_GROUP = "evaluation"
DEPLOY_GROUP = "deployment"
CANDIDATES = ("pretrained_checkpoint", "finetuned_checkpoint")
SCORES_IN_RANGE = "scores_in_range"
NOT_WORSE_THAN_DEPLOYED = "not_worse_than_deployed"
DEFAULT_LIMITS = {"micro": 40, "demo": 200, "gpt2-124m": None}
MANIFEST_FORMAT = "nanogpt-pipeline/deployment"


def current_manifest_path(artifacts: ArtifactStore) -> Path:
    """The file the server watches: always the newest deployment."""
    return artifacts.path("deployment", "current.json")


def read_current_deployment(artifacts: ArtifactStore) -> dict | None:
    path = current_manifest_path(artifacts)
    return json.loads(path.read_text()) if path.exists() else None


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def choose_benchmark(config: EvalConfig) -> tuple[str, str | None]:
    data = config.data_path or os.environ.get("NANOGPT_HELLASWAG")
    if config.benchmark == "hellaswag" or (config.benchmark == "auto" and data):
        return "hellaswag", data
    if config.benchmark == "auto" and config.profile == "gpt2-124m":
        return "hellaswag", None  # the real benchmark, downloaded when reachable
    return ("demo-cloze" if config.benchmark in ("auto", "demo-cloze") else config.benchmark), None


@dg.asset(group_name=EVAL_GROUP, kinds={"pytorch"}, code_version="1", deps=list(CANDIDATES),
          check_specs=[
              dg.AssetCheckSpec(SCORES_IN_RANGE, asset="hellaswag_scores",
                                description="every accuracy lies in [0, 1] and n is as configured"),
              dg.AssetCheckSpec(NOT_WORSE_THAN_DEPLOYED, asset="hellaswag_scores", blocking=True,
                                description="the best candidate scores no worse than the deployed model on the "
                                            "same benchmark (the first deployment passes)"),
          ],
          description="Both checkpoints scored on the same multiple-choice benchmark (HellaSwag, or the "
                      "offline demo cloze set), so they can be compared.")
def hellaswag_scores(context: dg.AssetExecutionContext, config: EvalConfig,
                     artifacts: ArtifactStore) -> dg.MaterializeResult:
    benchmark, data = choose_benchmark(config)
    limit = config.limit if config.limit is not None else DEFAULT_LIMITS.get(config.profile)
    scores = {}
    for asset in CANDIDATES:
        upstream = latest_output(context, asset)
        result = evaluate_checkpoint(upstream.path, data, benchmark=benchmark, limit=limit)
        scores[asset] = {**result, "checkpoint": str(upstream.path), "checkpoint_data_version": upstream.data_version}
        context.log.info(f"{asset}: {benchmark} acc_norm {result['acc_norm']:.4f} (n={result['n']})")
    best = max(CANDIDATES, key=lambda a: (scores[a]["acc_norm"], a == "finetuned_checkpoint"))
    payload = {"benchmark": benchmark, "limit": limit, "scores": scores, "best": best}
    version = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    path = artifacts.path("hellaswag_scores", version, "scores.json")
    write_json_atomically(path, payload)

    in_range = all(0.0 <= s[k] <= 1.0 for s in scores.values() for k in ("acc", "acc_norm"))
    n_ok = all(limit is None or s["n"] == limit for s in scores.values())
    deployed = read_current_deployment(artifacts)
    deployed_score = None
    if deployed and deployed.get("scores", {}).get("benchmark") == benchmark:
        deployed_score = deployed["scores"].get("acc_norm")
    candidate_score = scores[best]["acc_norm"]
    not_worse = deployed_score is None or candidate_score >= deployed_score
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(path)), "benchmark": benchmark, "best": best,
                  **{f"{a}_acc_norm": scores[a]["acc_norm"] for a in CANDIDATES},
                  **{f"{a}_acc": scores[a]["acc"] for a in CANDIDATES},
                  "n": scores[best]["n"], "deployed_acc_norm": deployed_score},
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(check_name=SCORES_IN_RANGE, passed=in_range and n_ok,
                                metadata={"n": scores[best]["n"], "configured_n": limit}),
            dg.AssetCheckResult(check_name=NOT_WORSE_THAN_DEPLOYED, passed=not_worse,
                                severity=dg.AssetCheckSeverity.ERROR,
                                metadata={"candidate_acc_norm": candidate_score, "deployed_acc_norm": deployed_score,
                                          "benchmark": benchmark}),
        ])


@dg.asset(group_name=DEPLOY_GROUP, kinds={"json"}, code_version="1", deps=[hellaswag_scores],
          description="The best-scoring checkpoint, named in a deployment manifest the server hot-swaps to.")
def deployed_model(context: dg.AssetExecutionContext, config: DeployConfig,
                   artifacts: ArtifactStore) -> dg.MaterializeResult:
    scores_output = latest_output(context, "hellaswag_scores")
    scores = json.loads(scores_output.path.read_text())
    winner = scores["scores"][scores["best"]]
    checkpoint = Path(winner["checkpoint"])
    lineage = read_checkpoint(checkpoint)["lineage"]
    deployment_id = hashlib.sha256(f"{checkpoint}:{scores_output.data_version}".encode()).hexdigest()[:16]
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": 1,
        "deployment_id": deployment_id,
        "model_id": config.model_id,
        "checkpoint_path": str(checkpoint),
        "checkpoint_name": checkpoint.name,
        "source_asset": scores["best"],
        "lineage": {**lineage, "checkpoint_data_version": winner["checkpoint_data_version"],
                    "scores_data_version": scores_output.data_version},
        "scores": {"benchmark": scores["benchmark"], "acc": winner["acc"], "acc_norm": winner["acc_norm"],
                   "n": winner["n"], "all": {a: {"acc": s["acc"], "acc_norm": s["acc_norm"]}
                                            for a, s in scores["scores"].items()}},
        "deployed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    versioned = artifacts.path("deployed_model", deployment_id, "deployment.json")
    write_json_atomically(versioned, manifest)
    write_json_atomically(current_manifest_path(artifacts), manifest)
    context.log.info(f"deployed {checkpoint} as {config.model_id}")
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(versioned)),
                  "manifest": dg.MetadataValue.path(str(current_manifest_path(artifacts))),
                  "checkpoint": dg.MetadataValue.path(str(checkpoint)), "model_id": config.model_id,
                  "source_asset": scores["best"], "benchmark": scores["benchmark"], "acc_norm": winner["acc_norm"]},
        data_version=dg.DataVersion(deployment_id))
