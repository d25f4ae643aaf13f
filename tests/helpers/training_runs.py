"""Training runs in tests: killing one part-way, and reading its metrics log and its checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanogpt_core.checkpoint import list_checkpoints, read_checkpoint
from tests.conftest import PROJECT_ROOT, python_env
from tests.helpers.processes import signal_tree


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    return [(m["step"], m.get("loss"), m.get("val_loss")) for m in read_metrics(run_dir)]


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Return once metrics.jsonl records `step`; fail if a process ends first or time runs out."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        for proc in procs:
            assert proc.poll() is None, f"{proc.args} ended ({proc.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {metrics} within {timeout} s")


def kill_run_at_step(module: str, args: list[str], run_dir: Path, step: int, nproc: int = 2) -> None:
    """Run `module` under a real torchrun and SIGKILL torchrun and every rank at once, as a crash
    would, as soon as the run's metrics log records `step`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    proc = subprocess.Popen(command, env=python_env(), cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, step, [proc])
    finally:
        signal_tree(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_same_final_weights(run_dir: Path, reference_dir: Path) -> None:
    """The newest checkpoints of two runs hold identical weights and optimizer moments, bit for bit."""
    ours = read_checkpoint(list_checkpoints(run_dir)[-1])
    theirs = read_checkpoint(list_checkpoints(reference_dir)[-1])
    assert ours["step"] == theirs["step"]
    assert ours["model"].keys() == theirs["model"].keys()
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), f"{name} differs between {run_dir} and {reference_dir}"
    for key, state in theirs["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours["optimizer"]["state"][key][moment], state[moment]), (key, moment)
