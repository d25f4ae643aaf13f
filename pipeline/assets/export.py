"""The deployed model in Hugging Face format, for transformers, vLLM, llama.cpp's converter and the hub."""


from pathlib import Path

import dagster as dg

from nanogpt_core.checkpoint import CheckpointError
from nanogpt_core.deployment_manifest import ManifestError, read_manifest
from nanogpt_core.hf import HFFormatError, export_checkpoint, verify_export
from pipeline.assets.deployment import DEPLOY_GROUP, deployed_model
from pipeline.resources import ArtifactStore
from pipeline.upstream import latest_output

EXPORT_MATCHES_CHECKPOINT = "hf_export_matches_checkpoint"


@dg.asset(group_name=DEPLOY_GROUP, kinds={"huggingface", "safetensors"}, code_version="1", deps=[deployed_model],
          check_specs=[dg.AssetCheckSpec(EXPORT_MATCHES_CHECKPOINT, asset="hf_export",
                                         description="the exported weights read back equal to the deployed "
                                                     "checkpoint's, and every tokenizer file is there")],
          description="The deployed checkpoint as a transformers GPT-2 folder: safetensors weights, tokenizer, "
                      "chat template and a model card with its lineage and scores.")
def hf_export(context: dg.AssetExecutionContext, artifacts: ArtifactStore) -> dg.MaterializeResult:
    deployment = latest_output(context, "deployed_model")
    checkpoint = Path(str(deployment.metadata.get("checkpoint", "")))
    if not checkpoint.is_file():
        raise dg.Failure(f"the deployed checkpoint {checkpoint} no longer exists; re-materialize deployed_model")
    try:
        manifest = read_manifest(deployment.path)
    except ManifestError as e:
        raise dg.Failure(f"cannot export the deployment: {e}") from e
    scratch = artifacts.scratch("hf_export")
    try:
        result = export_checkpoint(checkpoint, scratch, scores=manifest.scores,
                                   title=f"{manifest.model_id} (nanogpt-pipeline GPT-2)")
    except (HFFormatError, CheckpointError) as e:
        raise dg.Failure(f"cannot export {checkpoint}: {e}") from e
    folder = artifacts.promote(scratch, "hf_export", result.content_hash)
    problems = verify_export(folder, checkpoint)
    context.log.info(f"exported {checkpoint} ({result.parameters:,} parameters) to {folder}")
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(folder)),
                  "checkpoint": dg.MetadataValue.path(str(checkpoint)),
                  "deployed_model_data_version": deployment.data_version,
                  "parameters": result.parameters,
                  "bytes": sum(result.files.values()),
                  "files": dg.MetadataValue.md(files_table(result.files)),
                  "model_card": dg.MetadataValue.md(result.model_card)},
        data_version=dg.DataVersion(result.content_hash),
        check_results=[dg.AssetCheckResult(check_name=EXPORT_MATCHES_CHECKPOINT, passed=not problems,
                                           metadata={"problems": "; ".join(problems) or "none"})])


def files_table(files: dict[str, int]) -> str:
    return "\n".join(["| file | bytes |", "| --- | ---: |", *(f"| {name} | {size:,} |" for name, size in files.items())])
