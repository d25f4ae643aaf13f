"""How training is launched: the deadline it runs under, and the run folder it resumes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from dagster._core.errors import DagsterPipesExecutionError

from nanogpt_core import config as profiles
from pipeline.assets.training import finetune_run_key
from pipeline.config import TorchrunConfig
from pipeline.torchrun import KILL_GRACE_S, Deadline, earliest_deadline, ran_out_of_time, torchrun_command


def test_without_any_limit_training_has_no_deadline():
    assert earliest_deadline(None, None, "the run's tag", 0) is None


def test_the_sooner_of_the_asset_limit_and_what_is_left_of_the_run_limit_wins():
    own = earliest_deadline(600, 3600, "the run's dagster/max_runtime tag", run_elapsed_s=100)
    assert own == Deadline(600, "max_runtime_s=600 in the asset config")
    run = earliest_deadline(600, 650, "the run's dagster/max_runtime tag", run_elapsed_s=100)
    assert run.seconds == 550
    assert run.reason.startswith("the run's dagster/max_runtime tag of 650 s for the whole run")
    assert "100 s had passed" in run.reason


def test_a_run_limit_already_spent_still_gives_training_a_moment_to_be_stopped_cleanly():
    assert earliest_deadline(None, 60, "run_monitoring.max_runtime_seconds", run_elapsed_s=90).seconds == 1.0


def test_a_deadline_wraps_torchrun_in_timeout_inside_the_parent_death_guard():
    command = torchrun_command(TorchrunConfig(profile="micro"), "nanogpt_core.train", ["--resume"],
                               Deadline(42.5, "test"))
    names = [part.rsplit("/", 1)[-1] for part in command]
    assert names[:3] == ["setpriv", "--pdeathsig", "INT"]
    assert names[3:6] == ["timeout", f"--kill-after={KILL_GRACE_S}", "42.500"]
    assert command[7:9] == ["-m", "torch.distributed.run"] and command[-3:] == ["-m", "nanogpt_core.train", "--resume"]
    assert "timeout" not in " ".join(torchrun_command(TorchrunConfig(profile="micro"), "nanogpt_core.train", []))


@pytest.mark.parametrize("code, elapsed, expected", [(124, 30.0, True), (137, 41.0, True), (124, 5.0, False),
                                                     (1, 30.0, False)])
def test_only_timeouts_exit_status_after_the_deadline_counts_as_running_out_of_time(code, elapsed, expected):
    error = DagsterPipesExecutionError(f"External execution process failed with code {code}")
    assert ran_out_of_time(error, elapsed, Deadline(30.0, "test")) is expected


def test_an_edited_fine_tuning_profile_gets_a_new_run_folder(monkeypatch):
    config = TorchrunConfig(profile="micro")
    before = finetune_run_key(config, "parent-v1", "prompts-v1")
    assert finetune_run_key(config, "parent-v1", "prompts-v1") == before  # same settings: the same run resumes
    micro = profiles.PROFILES["micro"]
    monkeypatch.setitem(profiles.PROFILES, "micro", replace(micro, finetune=replace(micro.finetune, max_lr=1e-2)))
    assert finetune_run_key(config, "parent-v1", "prompts-v1") != before
    assert finetune_run_key(TorchrunConfig(profile="micro", max_steps=7), "parent-v1", "prompts-v1") != \
        finetune_run_key(config, "parent-v1", "prompts-v1")
