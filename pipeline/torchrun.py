"""Launch a training module under torchrun through Dagster Pipes, and explain its failures.

A launch can carry a deadline. Dagster's run monitoring enforces a run's `dagster/max_runtime`
tag only for runs its daemon launched; a run started with `dagster asset materialize` (or
in a test) has no such watcher. So the launch enforces the same limit itself, with
coreutils `timeout` around torchrun: SIGTERM when the time is up (torchrun passes it on to
every rank), SIGKILL a grace period later for whatever still stands. A rank that is frozen
cannot act on SIGTERM; it dies when torchrun does, through the parent-death signal every
rank asks for (nanogpt_core.distributed.die_with_parent).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError
from pydantic import Field

from pipeline.config import TorchrunConfig

# Dagster's name for a run's time limit, read by its run monitoring daemon (in seconds).
MAX_RUNTIME_TAG = "dagster/max_runtime"
# How long torchrun gets to stop its ranks after SIGTERM before `timeout` sends SIGKILL.
KILL_GRACE_S = 10
# `timeout`'s exit status when the time ran out: 124 after SIGTERM worked, 128 + 9 after SIGKILL.
TIMED_OUT_STATUSES = (124, 137)


class TrainingConfig(TorchrunConfig):
    max_runtime_s: Optional[float] = Field(
        None, gt=0,
        description="stop training (torchrun and every rank) after this many seconds; the run's "
                    "dagster/max_runtime tag, or run_monitoring.max_runtime_seconds in dagster.yaml, "
                    "applies too, whichever ends first")


@dataclass(frozen=True)
class Deadline:
    seconds: float  # from the launch
    reason: str  # which limit set it, for the error message


def earliest_deadline(configured_s: float | None, run_limit_s: float | None, run_limit_source: str,
                      run_elapsed_s: float) -> Deadline | None:
    """The sooner of the asset's own limit and what is left of the run's; None when neither is set.

    A run limit counts from the run's start, so what earlier steps used is taken off it.
    """
    candidates = []
    if configured_s:
        candidates.append(Deadline(configured_s, f"max_runtime_s={configured_s:g} in the asset config"))
    if run_limit_s:
        left = max(1.0, run_limit_s - run_elapsed_s)
        candidates.append(Deadline(left, f"{run_limit_source} of {run_limit_s:g} s for the whole run "
                                         f"({run_elapsed_s:.0f} s had passed when training started)"))
    return min(candidates, key=lambda d: d.seconds, default=None)


def training_deadline(context: dg.AssetExecutionContext, configured_s: float | None) -> Deadline | None:
    """The deadline for a training launch in this run: the asset's limit, the run's tag, or the
    instance's default maximum runtime."""
    instance = context.instance
    tag = context.run.tags.get(MAX_RUNTIME_TAG)
    if tag is not None:
        try:
            run_limit: float | None = float(tag)
        except ValueError:
            raise dg.Failure(f"the run tag {MAX_RUNTIME_TAG}={tag!r} is not a number of seconds") from None
        source = f"the run's {MAX_RUNTIME_TAG} tag"
    else:
        run_limit = float(instance.run_monitoring_max_runtime_seconds or 0) or None
        source = "run_monitoring.max_runtime_seconds in dagster.yaml"
    record = instance.get_run_record_by_id(context.run.run_id)
    started = record.start_time if record is not None and record.start_time else time.time()
    return earliest_deadline(configured_s, run_limit, source, time.time() - started)


def torchrun_command(config: TorchrunConfig, module: str, args: list[str],
                     deadline: Deadline | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m module args`, tied to the life of this process.

    `setpriv --pdeathsig INT` makes Linux interrupt the launch when the Dagster step process
    dies, even by SIGKILL; without it torchrun is re-parented and trains on unseen. With a
    deadline, `timeout` sits between the two and passes that interrupt on to torchrun.
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={config.nproc_per_node}"]
    if config.nnodes > 1:
        if not config.rdzv_endpoint:
            raise dg.Failure(f"nnodes={config.nnodes} needs rdzv_endpoint (host:port every node can reach)")
        launcher += [f"--nnodes={config.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={config.rdzv_endpoint}"]
    else:
        launcher += ["--standalone"]
    command = [*launcher, "-m", module, *args]
    if deadline is not None:
        timeout = shutil.which("timeout")
        if timeout is None:
            raise dg.Failure(f"a maximum runtime applies ({deadline.reason}) but coreutils `timeout`, which "
                             f"enforces it, is not on PATH")
        command = [timeout, f"--kill-after={KILL_GRACE_S}", f"{deadline.seconds:.3f}", *command]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT", *command] if setpriv else command


def run_through_pipes(context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient,
                      command: list[str], env: dict[str, str] | None = None,
                      deadline: Deadline | None = None) -> dg.PipesClientCompletedInvocation:
    """Run the command; when a rank fails, raise its own exception text instead of an exit code.

    torchrun writes the first failing rank's error (as recorded by `errors.record` on the
    entry point) to TORCHELASTIC_ERROR_FILE. A launch stopped by its deadline says so, and
    which limit it was.
    """
    with tempfile.TemporaryDirectory(prefix="torchrun-error-") as scratch:
        error_file = Path(scratch) / "error.json"
        context.log.info("launching: " + " ".join(command))
        if deadline is not None:
            context.log.info(f"training may run for {deadline.seconds:.0f} s: {deadline.reason}")
        started = time.monotonic()
        try:
            return client.run(context=context, command=command,
                              env={**(env or {}), "TORCHELASTIC_ERROR_FILE": str(error_file),
                                   "PYTHONUNBUFFERED": "1"})
        except DagsterPipesExecutionError as e:
            if deadline is not None and ran_out_of_time(e, time.monotonic() - started, deadline):
                raise dg.Failure(
                    description=f"training ran past its maximum runtime of {deadline.seconds:.0f} s "
                                f"({deadline.reason}), so torchrun and every rank were stopped. The run folder "
                                f"keeps its last complete checkpoint: materialize again to resume from it, or "
                                f"raise the limit") from e
            message, traceback = read_rank_error(error_file)
            if message is None:
                raise
            raise dg.Failure(description=f"training failed: {message}",
                             metadata={"traceback": dg.MetadataValue.text(traceback or message)}) from e


def ran_out_of_time(error: DagsterPipesExecutionError, elapsed_s: float, deadline: Deadline) -> bool:
    status = re.search(r"failed with code (-?\d+)", str(error))
    return status is not None and int(status.group(1)) in TIMED_OUT_STATUSES and elapsed_s >= deadline.seconds


def read_rank_error(error_file: Path) -> tuple[str | None, str | None]:
    """(message, traceback) from torchrun's error file; (None, None) when there is none."""
    try:
        payload = json.loads(error_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    detail = payload.get("message", payload)
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except json.JSONDecodeError:
            return detail.strip().splitlines()[-1], detail
    message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
    traceback = (detail.get("extraInfo", {}) or {}).get("py_callstack") if isinstance(detail, dict) else None
    last_line = (message or traceback or "").strip().splitlines()
    return (last_line[-1] if last_line else None), traceback
