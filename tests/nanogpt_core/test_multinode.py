"""Training across two hosts: one torchrun agent per host, c10d rendezvous, gloo.

The hosts are network namespaces joined by a veth pair (see tests.helpers.hosts), so the
rendezvous and every gradient all-reduce cross a link between two addresses. Each node
runs one process with one thread, which makes the run comparable, bit for bit, with one
node running two single-threaded processes: same seed, same global batch, same ranks.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogpt_core.checkpoint import list_checkpoints, read_checkpoint

from ..conftest import PROJECT_ROOT, python_env, run_module
from ..helpers.hosts import Host, SimulatedHosts, two_hosts
from ..helpers.ports import free_port
from ..helpers.processes import is_alive, process_tree, signal_tree
from ..helpers.training_runs import assert_same_final_weights, losses, wait_for_step

pytestmark = pytest.mark.slow

STEPS = 10
TRAIN_ARGS = ["--profile", "micro", "--max-steps", str(STEPS), "--checkpoint-every", "4", "--val-every", "4",
              "--threads", "1"]
LAUNCH_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def hosts() -> Iterator[SimulatedHosts]:
    with two_hosts() as sim:
        print(f"\nmulti-node tests: {sim.note}")
        if not sim.isolated:
            warnings.warn(sim.note, stacklevel=1)
        yield sim


def node_command(sim: SimulatedHosts, host: Host, port: int, train_args: list[str]) -> list[str]:
    """One node's torchrun: c10d rendezvous at node 0, which hosts the store.

    `--local-addr` is the address the other node reaches this one at (the machine's host
    name resolves to no address inside a namespace); it also orders the node ranks.
    """
    is_host = int(host is sim.hosts[0])
    return host.command([
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={sim.hosts[0].address}:{port}",
        f"--rdzv-conf=is_host={is_host},join_timeout=120", f"--local-addr={host.address}",
        "-m", "nanogpt_core.train", *train_args])


@contextlib.contextmanager
def two_nodes(sim: SimulatedHosts, logs: Path, train_args: list[str]) -> Iterator[list[subprocess.Popen]]:
    """Start one agent per host; whatever happens in the test, none of their processes outlives it."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for host in sim.hosts:
            env = {**python_env(), "GLOO_SOCKET_IFNAME": host.interface, "PYTHONUNBUFFERED": "1"}
            with open(logs / f"{host.name}.log", "w") as log:
                procs.append(subprocess.Popen(node_command(sim, host, port, train_args), env=env, cwd=PROJECT_ROOT,
                                              stdout=log, stderr=subprocess.STDOUT))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()


def node_log(logs: Path, index: int) -> str:
    return (logs / f"node{index}.log").read_text(errors="replace")


def wait_all(procs: list[subprocess.Popen], logs: Path) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for proc in procs:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    for index, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {index} failed ({proc.returncode}):\n{node_log(logs, index)[-4000:]}"


@pytest.fixture(scope="module")
def one_node_run(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_node_two_procs")
    run_module("nanogpt_core.train", *TRAIN_ARGS, "--data", str(demo_shards), "--out", str(out), nproc=2)
    return out


@pytest.fixture(scope="module")
def two_node_run(hosts, demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_nodes")
    with two_nodes(hosts, out.parent / f"{out.name}_logs", [*TRAIN_ARGS, "--data", str(demo_shards),
                                                             "--out", str(out)]) as procs:
        wait_all(procs, out.parent / f"{out.name}_logs")
    return out


@pytest.fixture(scope="module")
def run_with_a_killed_node(hosts, demo_shards, tmp_path_factory) -> dict:
    """A two-node run whose node 1 agent is SIGKILLed after the first checkpoint."""
    out = tmp_path_factory.mktemp("killed_node")
    logs = out.parent / f"{out.name}_logs"
    timeout_s = 30
    args = [*TRAIN_ARGS, "--process-group-timeout-s", str(timeout_s), "--data", str(demo_shards), "--out", str(out)]
    with two_nodes(hosts, logs, args) as (node0, node1):
        wait_for_step(out, 4, [node0, node1], timeout=LAUNCH_TIMEOUT_S)  # the step-3 checkpoint is on disk
        workers = process_tree(node1.pid)[1:]
        node1.kill()  # the agent alone: its worker has to notice by itself
        killed_at = time.monotonic()
        node0.wait(timeout=timeout_s + 30)
        survivor_exit_s = time.monotonic() - killed_at
    orphans = [pid for pid in workers if is_alive(pid)]
    for pid in orphans:
        signal_tree(pid, signal.SIGKILL)
    return {"out": out, "survivor_rc": node0.returncode, "survivor_exit_s": survivor_exit_s,
            "survivor_log": node_log(logs, 0), "timeout_s": timeout_s, "node1_workers": workers, "orphans": orphans}


def test_two_nodes_of_one_process_match_one_node_of_two_bit_for_bit(one_node_run, two_node_run, hosts):
    final = read_checkpoint(list_checkpoints(two_node_run)[-1])
    assert final["step"] == STEPS - 1 and final["lineage"]["world_size"] == 2
    assert losses(two_node_run) == losses(one_node_run)
    assert_same_final_weights(two_node_run, one_node_run)


def test_killing_one_nodes_agent_ends_the_other_within_the_timeout_naming_the_lost_rank(run_with_a_killed_node,
                                                                                     hosts):
    run = run_with_a_killed_node
    print(f"\nnode 0 stopped {run['survivor_exit_s']:.1f} s after node 1's agent was killed")
    assert run["survivor_rc"] != 0
    assert run["survivor_exit_s"] < run["timeout_s"], f"node 0 took {run['survivor_exit_s']:.1f} s to stop"
    node1_address = hosts.hosts[1].address if hosts.isolated else "127.0.0.1"
    assert f"rank 0 lost rank 1 at {node1_address}" in run["survivor_log"], run["survivor_log"][-4000:]
    assert not (run["out"] / f"model_{STEPS - 1:05d}.pt").exists(), "killed part-way, not at the end"


def test_a_two_node_run_resumes_bit_for_bit(run_with_a_killed_node, two_node_run, hosts, demo_shards):
    out = run_with_a_killed_node["out"]
    assert list_checkpoints(out), "a checkpoint was written before the kill"
    logs = out.parent / f"{out.name}_resume_logs"
    with two_nodes(hosts, logs, [*TRAIN_ARGS, "--data", str(demo_shards), "--out", str(out), "--resume"]) as procs:
        wait_all(procs, logs)
    assert "resuming from" in node_log(logs, 0)
    assert losses(out) == losses(two_node_run)
    assert_same_final_weights(out, two_node_run)
    assert read_checkpoint(list_checkpoints(out)[-1])["lineage"]["resumed_from"].endswith(".pt")


def test_a_hung_node_ends_the_other_after_the_timeout_naming_the_silent_rank(hosts, demo_shards, tmp_path):
    timeout_s = 10
    out = tmp_path / "run"
    args = [*TRAIN_ARGS, "--max-steps", "400", "--process-group-timeout-s", str(timeout_s),
            "--data", str(demo_shards), "--out", str(out)]
    with two_nodes(hosts, tmp_path / "logs", args) as (node0, node1):
        wait_for_step(out, 2, [node0, node1], timeout=LAUNCH_TIMEOUT_S)
        signal_tree(node1.pid, signal.SIGSTOP)  # alive, sockets open, silent: a hung or cut-off machine
        frozen_at = time.monotonic()
        node0.wait(timeout=timeout_s + 60)
        waited = time.monotonic() - frozen_at
    log = node_log(tmp_path / "logs", 0)
    print(f"\nnode 0 stopped {waited:.1f} s after node 1 froze (timeout {timeout_s} s)")
    assert node0.returncode != 0
    assert f"rank 0 timed out after {timeout_s} s (process_group_timeout_s) waiting for rank 1" in log, log[-4000:]
    assert timeout_s - 3 <= waited < timeout_s + 45, f"node 0 stopped {waited:.1f} s after node 1 froze"


def test_a_killed_agents_worker_does_not_outlive_it(run_with_a_killed_node):
    assert run_with_a_killed_node["node1_workers"], "node 1 had a worker to kill"
    assert run_with_a_killed_node["orphans"] == []
