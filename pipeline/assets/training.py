"""Training assets: pretraining and fine-tuning, each a torchrun launched through Dagster Pipes.

The run folder is keyed by everything that determines the result (resolved config, upstream
data versions, number of processes), and training always starts with `--resume`: after an
interrupted run, materializing again continues from the last complete checkpoint, and a
finished run is not trained twice.
"""


import hashlib
import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import dagster as dg

from nanogpt_core.checkpoint import CheckpointError, read_checkpoint
from nanogpt_core.config import FinetuneConfig, get_finetune_profile
from pipeline.assets.data import dolly_prompts, token_shards
from pipeline.cluster.k8s_launch import run_training_on_kubernetes
from pipeline.cluster.k8s_spec import cluster_from_env
from pipeline.config import TorchrunConfig
from pipeline.loss_curve import loss_curve_markdown, loss_curve_svg, read_metrics
from pipeline.report_cards import report_card_metadata
from pipeline.resources import ArtifactStore
from pipeline.torchrun import TrainingConfig, run_through_pipes, torchrun_command, training_deadline
from pipeline.upstream import latest_output

TRAINING_GROUP = "training"
CHECKPOINT_CHECK = "checkpoint_loads_and_learned"


def run_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trainer_overrides(config: TorchrunConfig) -> list[str]:
    return [*(["--max-steps", str(config.max_steps)] if config.max_steps else []), *config.extra_args]


def finetune_config(config: TorchrunConfig) -> FinetuneConfig:
    """The fine-tuning config the trainer resolves from the profile (extra_args aside, which are keyed as given)."""
    cfg = get_finetune_profile(config.profile)
    return replace(cfg, max_steps=config.max_steps) if config.max_steps else cfg


def finetune_run_key(config: TorchrunConfig, parent_version: str, prompts_version: str) -> str:
    """Keyed on the resolved config, not the profile's name, so an edited profile starts a new run
    rather than resuming one made with the old settings."""
    return run_key(finetune_config(config).to_dict(), parent_version, prompts_version,
                   config.nproc_per_node * config.nnodes, config.extra_args)


def launch_training(context: dg.AssetExecutionContext, config: TrainingConfig,
                    client: dg.PipesSubprocessClient, module: str,
                    args: list[str]) -> dg.PipesClientCompletedInvocation:
    deadline = training_deadline(context, config.max_runtime_s)
    cluster = cluster_from_env() if config.nnodes > 1 else None
    if cluster is not None:  # nodes 1..N-1 are started by Kubernetes, not by hand (docs/ARCHITECTURE.md)
        return run_training_on_kubernetes(context, cluster, config, module, args,
                                          deadline_s=deadline.seconds if deadline else None)
    return run_through_pipes(context, client, torchrun_command(config, module, args, deadline), deadline=deadline)


def checkpoint_check(asset: str, checkpoint: Path) -> dg.AssetCheckResult:
    """The checkpoint loads safely, and training lowered the validation loss below step 0's."""
    try:
        payload = read_checkpoint(checkpoint)
    except CheckpointError as e:
        return dg.AssetCheckResult(check_name=CHECKPOINT_CHECK, asset_key=asset, passed=False,
                                   metadata={"error": str(e)})
    metrics = payload.get("metrics", {})
    final, initial = metrics.get("val_loss"), metrics.get("initial_val_loss")
    learned = final is not None and math.isfinite(final) and (initial is None or final < initial)
    return dg.AssetCheckResult(check_name=CHECKPOINT_CHECK, asset_key=asset, passed=bool(learned),
                               metadata={"val_loss": final, "initial_val_loss": initial,
                                         "loads_with_weights_only": True})


def finish_training(context: dg.AssetExecutionContext, artifacts: ArtifactStore, asset: str,
                    invocation: dg.PipesClientCompletedInvocation, run_dir: Path,
                    upstream_versions: dict[str, str]) -> dg.MaterializeResult:
    """Place the final checkpoint under its data version and add the loss curve and checks."""
    reported = invocation.get_materialize_result()
    if reported.data_version is None:
        raise dg.Failure(f"{asset}: the trainer reported no data version")
    version = reported.data_version.value
    checkpoint = Path(str(reported.metadata["checkpoint"].value))
    folder = artifacts.path(asset, version)
    folder.mkdir(parents=True, exist_ok=True)
    published = folder / checkpoint.name
    if not published.exists():
        tmp = folder / (checkpoint.name + ".tmp")
        try:
            os.link(checkpoint, tmp)  # a hard link: no copy, and keep-last pruning cannot remove it
        except OSError:
            shutil.copy2(checkpoint, tmp)
        os.replace(tmp, published)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    svg = loss_curve_svg(metrics, asset)
    (folder / "loss_curve.svg").write_text(svg)
    shutil.copy2(run_dir / "metrics.jsonl", folder / "metrics.jsonl")
    metadata = {key: value for key, value in reported.metadata.items()}
    metadata.update({
        "path": dg.MetadataValue.path(str(published)),
        "run_dir": dg.MetadataValue.path(str(run_dir)),
        "loss_curve": dg.MetadataValue.md(loss_curve_markdown(svg)),
        "loss_curve_file": dg.MetadataValue.path(str(folder / "loss_curve.svg")),
        **{f"upstream_{name}_data_version": v for name, v in upstream_versions.items()},
    })
    wall = reported.metadata.get("wall_seconds")
    # The held-out documents are pretraining text: the base model's yardstick; the chat model's are its replies.
    metadata.update(report_card_metadata(context, artifacts, published, metrics, wall.value if wall else None,
                                         reported.metadata["lineage"].value.get("profile", ""),
                                         held_out=asset == "pretrained_checkpoint"))
    return dg.MaterializeResult(metadata=metadata, data_version=reported.data_version,
                                check_results=[checkpoint_check(asset, published)])


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch"}, code_version="1", deps=[token_shards], pool="training",
          check_specs=[dg.AssetCheckSpec(CHECKPOINT_CHECK, asset="pretrained_checkpoint",
                                         description="loads with weights_only; val loss finite and below step 0's")],
          description="GPT-2 pretrained on the token shards by torchrun (DDP), launched through Pipes.")
def pretrained_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, artifacts: ArtifactStore,
                          pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    shards = latest_output(context, "token_shards")
    cfg = config.train_config()
    if config.max_steps:
        cfg = replace(cfg, max_steps=config.max_steps)
    run_dir = artifacts.path("pretrained_checkpoint", "runs",
                             run_key(cfg.to_dict(), shards.data_version, config.nproc_per_node * config.nnodes,
                                     config.extra_args))
    args = ["--profile", config.profile, "--data", str(shards.path), "--out", str(run_dir), "--resume",
            *trainer_overrides(config)]
    invocation = launch_training(context, config, pipes_subprocess_client, "nanogpt_core.train", args)
    return finish_training(context, artifacts, "pretrained_checkpoint", invocation, run_dir,
                           {"token_shards": shards.data_version})


@dg.asset(group_name=TRAINING_GROUP, kinds={"pytorch"}, code_version="1",
          deps=[pretrained_checkpoint, dolly_prompts], pool="training",
          check_specs=[dg.AssetCheckSpec(CHECKPOINT_CHECK, asset="finetuned_checkpoint",
                                         description="loads with weights_only; val loss finite and below step 0's")],
          description="The pretrained model fine-tuned on the instruction prompts (prompt tokens masked), "
                      "by torchrun through Pipes.")
def finetuned_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, artifacts: ArtifactStore,
                         pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    parent = latest_output(context, "pretrained_checkpoint")
    prompts = latest_output(context, "dolly_prompts")
    run_dir = artifacts.path("finetuned_checkpoint", "runs",
                             finetune_run_key(config, parent.data_version, prompts.data_version))
    args = ["--profile", config.profile, "--init", str(parent.path), "--data", str(prompts.path),
            "--out", str(run_dir), "--resume", *trainer_overrides(config)]
    invocation = launch_training(context, config, pipes_subprocess_client, "nanogpt_core.finetune", args)
    return finish_training(context, artifacts, "finetuned_checkpoint", invocation, run_dir,
                           {"pretrained_checkpoint": parent.data_version, "dolly_prompts": prompts.data_version})
