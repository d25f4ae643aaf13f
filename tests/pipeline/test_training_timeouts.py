"""A hung rank and a training run past its time limit each end the Dagster run with an error
that says why, leave no process behind, and leave the "training" pool slot to the next run.

The instance takes its concurrency and run-monitoring settings from dagster_home/dagster.yaml,
so the pool limit under test is the one the project ships. Training is real torchrun with two
gloo ranks, launched through Pipes.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from pipeline.definitions import defs
from pipeline.pipes_messages import training_pipes_client
from pipeline.resources import ArtifactStore
from pipeline.torchrun import KILL_GRACE_S, MAX_RUNTIME_TAG

from ..conftest import PROJECT_ROOT
from .conftest import micro_run_config

pytestmark = pytest.mark.slow

PROCESS_GROUP_TIMEOUT_S = 10
# torchrun gives a failed run's other ranks this long to exit on SIGTERM before SIGKILL; a
# frozen rank cannot exit, so it always takes the full wait (torch's fixed default).
TORCHRUN_SHUTDOWN_WAIT_S = 30
TRAINING_POOL = "training"
log = logging.getLogger(__name__)


def shipped_instance_settings() -> dict:
    settings = yaml.safe_load((PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text())
    return {key: settings[key] for key in ("concurrency", "run_monitoring")}


@pytest.fixture(scope="module")
def instance_with_shards(tmp_path_factory):
    """An instance with the shipped settings, and token shards built once for every test here."""
    root = tmp_path_factory.mktemp("artifacts")
    with dg.instance_for_test(overrides=shipped_instance_settings()) as instance:
        result = materialize(["raw_fineweb", "token_shards"], instance, root)
        assert result.success
        yield instance, root


def materialize(selection: list[str], instance: dg.DagsterInstance, root: Path, tags: dict | None = None,
                **per_asset: dict) -> dg.ExecuteInJobResult:
    return dg.materialize(
        [*defs.assets], selection=selection, instance=instance, tags=tags,
        resources={"artifacts": ArtifactStore(root=str(root)), "pipes_subprocess_client": training_pipes_client()},
        run_config=micro_run_config(selection, **per_asset), raise_on_error=False)


def failure_text(result: dg.ExecuteInJobResult, step: str) -> str:
    failures = [e for e in result.all_events if e.is_step_failure and e.step_key == step]
    assert failures, f"{step} did not fail"
    return str(failures[0].event_specific_data.error)


def training_processes() -> list[psutil.Process]:
    """torchrun and its ranks among this test process's descendants."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "nanogpt_core.train" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def rank_of(proc: psutil.Process) -> int | None:
    """The rank torchrun gave a worker; None for torchrun itself. Raises psutil.Error once it is gone."""
    rank = proc.environ().get("RANK")
    return int(rank) if rank is not None else None


def logged_steps(root: Path, since: float) -> int:
    """Steps in the newest metrics.jsonl of a pretraining run started after `since`."""
    best = 0
    for metrics in root.glob("pretrained_checkpoint/runs/*/metrics.jsonl"):
        if metrics.stat().st_mtime >= since:
            best = max(best, sum(1 for line in metrics.read_text().splitlines() if "loss" in json.loads(line)))
    return best


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Watch(threading.Thread):
    """Runs beside a materialization: records every training process it sees (pid: rank), and
    once the run has logged `freeze_after_steps` steps (if given), freezes rank 1 with SIGSTOP."""

    def __init__(self, instance: dg.DagsterInstance, root: Path, freeze_after_steps: int | None = None):
        super().__init__(daemon=True)
        self.instance, self.root, self.freeze_after_steps = instance, root, freeze_after_steps
        self.started = time.time()
        self.seen: dict[int, int | None] = {}
        self.frozen_pid: int | None = None
        self.frozen_at: float | None = None
        self.slots_claimed_while_frozen: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for proc in training_processes():
                if proc.pid not in self.seen:
                    try:
                        self.seen[proc.pid] = rank_of(proc)
                    except psutil.Error:
                        continue
            if (self.freeze_after_steps is not None and self.frozen_pid is None
                    and logged_steps(self.root, self.started) >= self.freeze_after_steps):
                rank1 = [pid for pid, rank in self.seen.items() if rank == 1 and not is_gone(pid)]
                if rank1:
                    psutil.Process(rank1[0]).send_signal(signal.SIGSTOP)
                    self.frozen_pid, self.frozen_at = rank1[0], time.monotonic()
                    info = self.instance.event_log_storage.get_concurrency_info(TRAINING_POOL)
                    self.slots_claimed_while_frozen = len(info.claimed_slots)
            time.sleep(0.05)

    def __enter__(self) -> "Watch":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()
        if self.frozen_pid is not None and not is_gone(self.frozen_pid):  # never leave a stopped process behind
            psutil.Process(self.frozen_pid).kill()


def assert_training_pool_is_free(instance: dg.DagsterInstance) -> None:
    info = instance.event_log_storage.get_concurrency_info(TRAINING_POOL)
    assert info.slot_count == 1, "dagster.yaml gives the training pool one slot"
    assert info.claimed_slots == [] and info.pending_steps == []


def test_a_frozen_rank_fails_the_run_naming_it_and_the_next_training_run_gets_the_pool_slot(instance_with_shards):
    instance, root = instance_with_shards
    with Watch(instance, root, freeze_after_steps=2) as watch:
        result = materialize(["pretrained_checkpoint"], instance, root, pretrained_checkpoint={
            "extra_args": ["--process-group-timeout-s", str(PROCESS_GROUP_TIMEOUT_S), "--max-steps", "500"]})
        ended_at = time.monotonic()
    assert watch.frozen_pid is not None, "rank 1 was never frozen"
    assert watch.slots_claimed_while_frozen == 1, "the hung run held the training slot"

    assert not result.success
    error = failure_text(result, "pretrained_checkpoint")
    assert (f"rank 0 timed out after {PROCESS_GROUP_TIMEOUT_S} s (process_group_timeout_s) waiting for rank 1"
            in error), error
    # Rank 0 gives up after the timeout; torchrun then waits its fixed grace for the frozen rank
    # before SIGKILL. Without the timeout, gloo would have waited 30 minutes.
    waited = ended_at - watch.frozen_at
    log.info("rank 1 frozen; the run ended %.1f s later", waited)
    assert PROCESS_GROUP_TIMEOUT_S <= waited < PROCESS_GROUP_TIMEOUT_S + TORCHRUN_SHUTDOWN_WAIT_S + 20, waited
    assert watch.seen and all(is_gone(pid) for pid in watch.seen), "torchrun or a rank outlived the run"

    assert_training_pool_is_free(instance)
    result = materialize(["pretrained_checkpoint"], instance, root,
                         pretrained_checkpoint={"extra_args": ["--max-steps", "3"]})
    assert result.success, failure_text(result, "pretrained_checkpoint")
    assert_training_pool_is_free(instance)


def test_the_runs_max_runtime_tag_stops_a_too_long_training_and_every_process_it_started(instance_with_shards):
    instance, root = instance_with_shards
    limit_s = 20  # time enough for torchrun and both ranks to be up on a loaded machine
    started = time.monotonic()
    with Watch(instance, root) as watch:
        result = materialize(["pretrained_checkpoint"], instance, root, tags={MAX_RUNTIME_TAG: str(limit_s)},
                             pretrained_checkpoint={"extra_args": ["--max-steps", "5000"]})
    took = time.monotonic() - started
    log.info("a run tagged with a %d s limit ended after %.1f s", limit_s, took)

    assert not result.success
    error = failure_text(result, "pretrained_checkpoint")
    assert "training ran past its maximum runtime of" in error, error
    assert f"the run's {MAX_RUNTIME_TAG} tag of {limit_s} s for the whole run" in error
    assert "materialize again to resume from it" in error
    assert took < limit_s + KILL_GRACE_S + 15, took
    assert sorted(rank for rank in watch.seen.values() if rank is not None) == [0, 1], \
        "both ranks were running when the limit struck"
    assert all(is_gone(pid) for pid in watch.seen), "torchrun or a rank outlived the run"
    assert_training_pool_is_free(instance)
