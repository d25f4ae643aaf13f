"""The pipeline through a real `dagster dev` (webserver + daemon) on a loopback port.

Runs are launched over GraphQL with the dagster_graphql client, exactly as the UI does, and
results are read back from the instance the server wrote to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from ..conftest import PROJECT_ROOT, python_env
from ..nanogpt_core.test_train import is_alive
from .conftest import ALL_ASSETS, data_version, latest_event

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DagsterServer:
    def __init__(self, home: Path, artifacts: Path, port: int, process: subprocess.Popen):
        self.home, self.artifacts, self.port, self.process = home, artifacts, port, process
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        self.url = f"http://127.0.0.1:{port}"

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def launch(self, assets: list[str], run_config: dict | None = None) -> str:
        return self.client.submit_job_execution("__ASSET_JOB", asset_selection=assets, run_config=run_config or {})

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.get_run_status(run_id).value
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                return status
            time.sleep(1)
        raise TimeoutError(f"run {run_id} still running after {timeout} s")


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    env = {**python_env(), "DAGSTER_HOME": str(home), "NANOGPT_PROFILE": "micro",
           "NANOGPT_ARTIFACTS": str(artifacts)}
    log = open(home / "dagster_dev.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)], cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    server = DagsterServer(home, artifacts, port, process)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{server.url}/server_info", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("dagster dev did not come up:\n" + (home / "dagster_dev.log").read_text())
                time.sleep(1)
        yield server
    finally:
        stop_process_group(process)
        log.close()


def stop_process_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_a_run_launched_over_graphql_records_which_shards_made_the_checkpoint(dagster_dev, tmp_path):
    run_id = dagster_dev.launch(ALL_ASSETS)
    assert dagster_dev.wait(run_id) == "SUCCESS", (dagster_dev.home / "dagster_dev.log").read_text()[-5000:]
    with dagster_dev.instance() as instance:
        shards_version = data_version(instance, "token_shards")
        pretrained = latest_event(instance, "pretrained_checkpoint")
        assert pretrained.metadata["upstream_token_shards_data_version"].value == shards_version
        # Dagster's own provenance names the same input version.
        assert pretrained.tags["dagster/input_data_version/token_shards"] == shards_version


def test_the_asset_graph_in_the_ui_shows_every_asset(dagster_dev, tmp_path):
    from playwright.sync_api import sync_playwright

    screenshot = tmp_path / "dagster_asset_graph.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update",
                                          "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{dagster_dev.url}/asset-groups", wait_until="networkidle", timeout=60_000)
        page.get_by_text("training", exact=True).first.wait_for(timeout=30_000)
        dismiss_welcome_dialog(page)
        # The global lineage view opens with groups collapsed; its context menu expands them.
        page.mouse.click(1100, 300, button="right")
        page.locator("text=Expand all groups >> visible=true").first.click(timeout=10_000)
        page.get_by_text("hellaswag_scores", exact=True).first.wait_for(timeout=30_000)
        # The graph shortens long names; the group tree beside it lists them whole.
        for group in ("data", "training", "evaluation", "deployment"):
            row = page.get_by_text(group, exact=True).first
            box = row.bounding_box()
            page.mouse.click(box["x"] - 40, box["y"] + box["height"] / 2)  # the row's disclosure arrow
            page.wait_for_timeout(300)
        page.wait_for_timeout(1000)
        html = page.content()
        missing = [asset for asset in ALL_ASSETS if asset not in html]
        page.screenshot(path=str(screenshot))
        browser.close()
    assert not missing, f"asset graph lacks {missing}"
    assert screenshot.stat().st_size > 10_000
    docs_copy = PROJECT_ROOT / "docs" / "screenshots" / "dagster_asset_graph.png"
    docs_copy.parent.mkdir(exist_ok=True)
    shutil.copy(screenshot, docs_copy)


def dismiss_welcome_dialog(page) -> None:
    """A fresh browser profile may get Dagster's one-time community dialog over the graph."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.click(timeout=3_000)
    except Exception:  # the dialog did not appear
        pass


def training_processes(run_dir_fragment: str) -> list[int]:
    """PIDs whose command line runs the trainer (torchrun and its workers) for this artifacts root."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "nanogpt_core.train" in text and run_dir_fragment in text:
            found.append(int(cmdline.parent.name))
    return found


def test_terminating_a_training_run_kills_every_worker_and_the_next_run_resumes(dagster_dev):
    long_run = {"ops": {"pretrained_checkpoint": {"config": {"max_steps": 300}}}}
    runs_dir = dagster_dev.artifacts / "pretrained_checkpoint" / "runs"
    earlier_runs = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    run_id = dagster_dev.launch(["pretrained_checkpoint"], long_run)
    deadline = time.monotonic() + 180
    pids: list[int] = []
    while time.monotonic() < deadline:
        pids = training_processes(str(dagster_dev.artifacts))
        this_run = [d for d in runs_dir.iterdir() if d not in earlier_runs] if runs_dir.exists() else []
        if len(pids) >= 3 and this_run and list(this_run[0].glob("model_*.pt")):
            break  # torchrun and both ranks are up, and this run has written a checkpoint
        time.sleep(0.5)
    assert len(pids) >= 3, "torchrun and two workers were running"
    dagster_dev.client.terminate_run(run_id)
    assert dagster_dev.wait(run_id, timeout=120) in ("CANCELED", "FAILURE")
    deadline = time.monotonic() + 30
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in pids if is_alive(pid)], "no trainer process outlives the run"

    rerun = dagster_dev.launch(["pretrained_checkpoint"], long_run)
    assert dagster_dev.wait(rerun) == "SUCCESS"
    with dagster_dev.instance() as instance:
        resumed_from = latest_event(instance, "pretrained_checkpoint").metadata["resumed_from"].value
    assert resumed_from and "model_" in resumed_from
