"""Fine-tuning under a real torchrun: loss falls, lineage names the parent, bit-exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nanogpt_core.checkpoint import list_checkpoints, load_checkpoint, read_checkpoint, save_checkpoint
from nanogpt_core.config import get_profile
from nanogpt_core.data.instructions import InstructionManifest
from nanogpt_core.config import get_finetune_profile
from nanogpt_core.finetune import finetune
from nanogpt_core.model import GPT

from ..conftest import run_module
from ..helpers.training_runs import kill_run_at_step, losses, read_metrics

pytestmark = pytest.mark.slow

STEPS = 10
FINETUNE_ARGS = ["--profile", "micro", "--max-steps", str(STEPS), "--checkpoint-every", "3", "--val-every", "3"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A micro model as pretraining would leave it: a checkpoint in a run folder."""
    run = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    cfg = get_profile("micro")
    save_checkpoint(run / "model_00019.pt", GPT(cfg.model_config()), step=19, train_config=cfg.to_dict(),
                    lineage={"profile": "micro", "data_version": "pretraining-shards", "parent_checkpoint": None})
    return run


def finetune_command(pretrained: Path, out: Path, *extra: str) -> list[str]:
    return [*FINETUNE_ARGS, "--init", str(pretrained), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted_run(pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetuned")
    result = run_module("nanogpt_core.finetune", *finetune_command(pretrained, out), nproc=2)
    assert "final checkpoint:" in result.stdout
    return out


def test_two_process_fine_tuning_lowers_train_and_val_loss(uninterrupted_run):
    train = [m["loss"] for m in read_metrics(uninterrupted_run) if "loss" in m]
    assert len(train) == STEPS
    assert sum(train[-3:]) / 3 < train[0] - 0.5
    final = read_checkpoint(list_checkpoints(uninterrupted_run)[-1])
    assert final["step"] == STEPS - 1
    assert final["metrics"]["val_loss"] < final["metrics"]["initial_val_loss"]
    fingerprints = final["metrics"]["rank_weight_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]


def test_metrics_record_the_epoch_and_the_pretraining_fields(uninterrupted_run):
    first, last = read_metrics(uninterrupted_run)[0], read_metrics(uninterrupted_run)[STEPS - 1]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "val_loss", "epoch"} <= set(first)
    assert 0 < first["epoch"] < last["epoch"] < 1


def test_the_checkpoint_names_its_parent_and_both_data_versions(uninterrupted_run, pretrained):
    path = list_checkpoints(uninterrupted_run)[-1]
    assert path.name == f"model_{STEPS - 1:05d}.pt"
    model, payload = load_checkpoint(path)  # the pretraining format: it loads the same way
    lineage = payload["lineage"]
    assert lineage["stage"] == "finetune"
    assert lineage["parent_checkpoint"] == str((pretrained / "model_00019.pt").resolve())
    assert lineage["parent_data_version"] == "pretraining-shards" and lineage["parent_step"] == 19
    manifest = InstructionManifest.load(uninterrupted_run / "data")
    assert lineage["data_version"] == manifest.data_version
    assert lineage["data_source"]["kind"] == "demo"  # the micro profile's source when no --data is given
    assert payload["train_config"]["stage"] == "finetune"
    assert model.config.n_embd == get_profile("micro").n_embd


def test_a_fine_tuning_run_killed_with_sigkill_resumes_bit_for_bit(uninterrupted_run, pretrained, tmp_path):
    out = tmp_path / "killed"
    kill_run_at_step("nanogpt_core.finetune", finetune_command(pretrained, out), out, step=6)
    assert not (out / f"model_{STEPS - 1:05d}.pt").exists(), "killed part-way, not at the end"
    assert list_checkpoints(out), "at least one checkpoint was written before the kill"

    run_module("nanogpt_core.finetune", *finetune_command(pretrained, out, "--resume"), nproc=2)

    assert losses(out) == losses(uninterrupted_run)  # exactly
    resumed = read_checkpoint(list_checkpoints(out)[-1])
    reference = read_checkpoint(list_checkpoints(uninterrupted_run)[-1])
    assert resumed["lineage"]["resumed_from"].endswith(".pt")
    assert resumed["lineage"]["parent_checkpoint"] == reference["lineage"]["parent_checkpoint"]
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_the_function_fine_tunes_on_a_dolly_file_in_process(shared_data, pretrained, tmp_path):
    cfg = get_finetune_profile("micro", max_steps=2, val_steps=1)
    dolly = shared_data / "dolly" / "dolly_style_1000.jsonl"
    result = finetune(cfg, pretrained / "model_00019.pt", tmp_path / "run", dolly)
    assert result.final_checkpoint == tmp_path / "run" / "model_00001.pt"
    manifest = InstructionManifest.load(tmp_path / "run" / "data")
    assert manifest.source["kind"] == "local" and manifest.skipped["too_long"] > 0  # 64-token micro context
    assert result.lineage["data_version"] == manifest.data_version


def test_bad_inputs_are_named_not_a_traceback(pretrained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Q", "context": "", "response": ""}) + "\n")
    absent = tmp_path / "absent.pt"
    for args, expected in [
        (["--init", str(absent), "--data", str(bad)], f"checkpoint {absent} does not exist"),
        (["--init", str(tmp_path)], f"no checkpoint to fine-tune from in {tmp_path}"),
        (["--init", str(pretrained), "--data", str(bad)], "no usable instruction rows"),
    ]:
        result = run_module("nanogpt_core.finetune", "--profile", "micro", "--out", str(tmp_path / "run"), *args,
                            check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert expected in result.stderr
