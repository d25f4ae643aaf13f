"""The trainer under a real torchrun: DDP on gloo, bit-exact resume after SIGKILL, clear errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanogpt_core.checkpoint import list_checkpoints, read_checkpoint

from ..conftest import PROJECT_ROOT, python_env, run_module
from ..helpers.processes import is_alive, process_tree
from ..helpers.training_runs import kill_run_at_step, losses, read_metrics

pytestmark = pytest.mark.slow

STEPS = 16
TRAIN_ARGS = ["--profile", "micro", "--max-steps", str(STEPS), "--checkpoint-every", "4", "--val-every", "4"]


@pytest.fixture(scope="module")
def uninterrupted_run(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_module("nanogpt_core.train", *TRAIN_ARGS, "--data", str(demo_shards), "--out", str(out), nproc=2)
    assert "final checkpoint:" in result.stdout
    return out


def test_two_process_ddp_training_lowers_the_loss_and_keeps_ranks_identical(uninterrupted_run):
    metrics = read_metrics(uninterrupted_run)
    train = [m["loss"] for m in metrics if "loss" in m]
    assert len(train) == STEPS
    assert sum(train[-4:]) / 4 < train[0] - 1.0
    final = read_checkpoint(list_checkpoints(uninterrupted_run)[-1])
    assert final["step"] == STEPS - 1
    assert final["metrics"]["val_loss"] < final["metrics"]["initial_val_loss"]
    fingerprints = final["metrics"]["rank_weight_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert final["lineage"]["world_size"] == 2
    assert len(final["rng"]) == 2  # each rank's generator state


def test_every_step_is_logged_with_the_promised_fields(uninterrupted_run):
    first = read_metrics(uninterrupted_run)[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "val_loss"} <= set(first)


def test_a_checkpoint_carries_its_lineage(uninterrupted_run, demo_shards):
    payload = read_checkpoint(list_checkpoints(uninterrupted_run)[-1])
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    lineage = payload["lineage"]
    assert lineage["data_version"] == manifest["data_version"]
    assert lineage["code_version"] and lineage["profile"] == "micro"
    assert "git_commit" in lineage and lineage["tokens_seen"] == STEPS * 1024
    assert payload["train_config"]["max_steps"] == STEPS


def test_a_run_killed_with_sigkill_resumes_bit_for_bit(uninterrupted_run, demo_shards, tmp_path):
    out = tmp_path / "killed"
    kill_run_at_step("nanogpt_core.train", [*TRAIN_ARGS, "--data", str(demo_shards), "--out", str(out)], out, step=9)
    assert not (out / f"model_{STEPS - 1:05d}.pt").exists(), "killed part-way, not at the end"
    assert list_checkpoints(out), "at least one checkpoint was written before the kill"

    run_module("nanogpt_core.train", *TRAIN_ARGS, "--data", str(demo_shards), "--out", str(out), "--resume", nproc=2)

    resumed_losses, reference_losses = losses(out), losses(uninterrupted_run)
    assert resumed_losses == reference_losses, (resumed_losses[-4:], reference_losses[-4:])  # exactly
    resumed = read_checkpoint(list_checkpoints(out)[-1])
    reference = read_checkpoint(list_checkpoints(uninterrupted_run)[-1])
    assert str(resumed["lineage"].get("resumed_from")).endswith(".pt"), \
        (resumed["lineage"], [p.name for p in list_checkpoints(out)])
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for key, state in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["exp_avg_sq"], state["exp_avg_sq"])


def test_killing_torchrun_alone_takes_its_workers_with_it(demo_shards, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "nanogpt_core.train", *TRAIN_ARGS, "--max-steps", "400", "--data", str(demo_shards),
               "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(command, env=python_env(), cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [pid for pid in process_tree(proc.pid) if pid != proc.pid]
        assert len(workers) >= 2
        proc.kill()  # SIGKILL: torchrun gets no chance to stop its workers itself
    finally:
        proc.wait()
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(is_alive(pid) for pid in workers)


def _train_fails(*args: str) -> str:
    result = run_module("nanogpt_core.train", *args, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_corrupt_shard_is_named_not_a_torch_traceback(demo_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_shards, data)
    shard = data / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    stderr = _train_fails("--profile", "micro", "--data", str(data), "--out", str(tmp_path / "run"))
    assert f"shard {shard} is corrupt or truncated" in stderr


def test_a_missing_data_folder_is_named(tmp_path):
    stderr = _train_fails("--profile", "micro", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    assert f"data folder {tmp_path / 'absent'} does not exist" in stderr


def test_resuming_with_an_incompatible_model_names_the_checkpoint(uninterrupted_run, demo_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    stderr = _train_fails(*TRAIN_ARGS, "--n-embd", "128", "--data", str(demo_shards), "--out", str(run),
                          "--resume")
    assert f"checkpoint {run / f'model_{STEPS - 1:05d}.pt'} was made with an incompatible model config" in stderr
    assert "n_embd: checkpoint 64 vs run 128" in stderr


def test_resuming_with_a_changed_training_config_is_refused_naming_the_fields(uninterrupted_run, demo_shards,
                                                                               tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    stderr = _train_fails(*TRAIN_ARGS, "--max-steps", "20", "--max-lr", "1e-3", "--val-every", "5",
                          "--data", str(demo_shards), "--out", str(run), "--resume")
    assert f"refusing to resume from {run / f'model_{STEPS - 1:05d}.pt'}" in stderr
    assert "max_lr: checkpoint 0.003 vs run 0.001" in stderr and "max_steps: checkpoint 16 vs run 20" in stderr
    assert "val_every" not in stderr  # how often validation runs does not change what is trained
    assert "--allow-changed-config" in stderr
    assert [p.name for p in list_checkpoints(run)] == [p.name for p in list_checkpoints(uninterrupted_run)]


def test_resuming_on_other_data_is_refused_unless_allowed(uninterrupted_run, tmp_path):
    from nanogpt_core.shards import build_shards

    other = build_shards([f"Another corpus, document {i}, about nothing in particular. " * 40 for i in range(60)],
                         tmp_path / "other", val_fraction=0.1)
    run = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run)
    saved_version = read_checkpoint(list_checkpoints(run)[-1])["lineage"]["data_version"]
    stderr = _train_fails(*TRAIN_ARGS, "--data", str(tmp_path / "other"), "--out", str(run), "--resume")
    assert f"data version: checkpoint {saved_version} vs run {other.data_version}" in stderr

    result = run_module("nanogpt_core.train", *TRAIN_ARGS, "--max-steps", str(STEPS + 1), "--data",
                        str(tmp_path / "other"), "--out", str(run), "--resume", "--allow-changed-config")
    assert "with changes allowed (data version:" in result.stderr
    assert "max_steps: checkpoint 16 vs run 17" in result.stderr
    final = read_checkpoint(list_checkpoints(run)[-1])
    assert final["step"] == STEPS and final["lineage"]["data_version"] == other.data_version
    assert final["lineage"]["resumed_from"].endswith(f"model_{STEPS - 1:05d}.pt")


def test_a_small_corpus_with_default_shard_settings_trains_on_micro(shared_data, tmp_path):
    """155 FineWeb-Edu documents at the default 1% val split leave one short document for
    validation, less than one micro batch on two processes: validation uses what there is."""
    data = tmp_path / "data"
    run_module("nanogpt_core.shards", "build", str(shared_data / "fineweb_edu" / "fineweb_edu_sample_155.parquet"),
               "--out", str(data))
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["documents"]["val"] == 1 and manifest["tokens"]["val"] < 4 * 64 * 2 + 1
    result = run_module("nanogpt_core.train", "--profile", "micro", "--max-steps", "2", "--data", str(data),
                        "--out", str(tmp_path / "run"), nproc=2)
    assert f"the val split of {data} holds {manifest['tokens']['val']} tokens" in result.stderr
    final = read_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert final["step"] == 1 and math.isfinite(final["metrics"]["val_loss"])


def test_with_a_muon_rate_the_blocks_train_under_muon_on_the_shared_schedule(demo_shards, tmp_path):
    out = tmp_path / "muon"
    run_module("nanogpt_core.train", "--profile", "micro", "--max-steps", "6", "--checkpoint-every", "6",
               "--val-every", "6", "--muon-lr", "0.03", "--data", str(demo_shards), "--out", str(out), nproc=2)
    final = read_checkpoint(list_checkpoints(out)[-1])
    assert final["optimizer"]["kinds"] == ["AdamW", "Muon"]
    adamw_state, muon_state = final["optimizer"]["pair"]
    last_lr = [m for m in read_metrics(out) if "lr" in m][-1]["lr"]
    assert muon_state["param_groups"][0]["lr"] == pytest.approx(last_lr * 0.03 / final["train_config"]["max_lr"])
    assert all(group["lr"] == pytest.approx(last_lr) for group in adamw_state["param_groups"])
    assert len(muon_state["state"]) == 4 * final["model_config"]["n_layer"]  # four matrices a block
    assert final["metrics"]["val_loss"] < final["metrics"]["initial_val_loss"]
