"""The pipeline through a real `dagster dev` (webserver + daemon) on a loopback port.

Runs are launched over GraphQL with the dagster_graphql client, exactly as the UI does, and
results are read back from the instance the server wrote to. A whole graph launched over
GraphQL, with its lineage read back, is test_postgres's (there on the production instance);
here the UI itself is driven, and a training run is stopped from it and resumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.browser import headless_chromium, update_docs_screenshot
from tests.helpers.dagster_dev import DagsterServer, run_dagster_dev
from tests.helpers.processes import is_alive

from .conftest import ALL_ASSETS, latest_event

pytestmark = pytest.mark.slow

# Long enough that the run is still training when it is stopped after its first checkpoint
# (micro checkpoints every 10 steps; the stop lands within a step of it, leaving 30 steps of
# margin), short enough that the resumed run ends soon after: every step past the first
# checkpoint is trained by the resumed run.
INTERRUPTED_RUN_STEPS = 40


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    with run_dagster_dev(tmp_path_factory.mktemp("dagster_home"), tmp_path_factory.mktemp("artifacts")) as server:
        yield server


@dataclass
class InterruptedTraining:
    trainer_pids: list[int]  # torchrun and its workers, seen running before the stop
    stopped_status: str
    survivors: list[int]
    resumed_status: str
    resumed_from: str | None


@pytest.fixture(scope="module")
def interrupted_training(dagster_dev: DagsterServer) -> InterruptedTraining:
    """Token shards, then a pretraining run stopped from the UI's API after its first checkpoint,
    then the same run launched again; its materialization is the one the UI tests look at."""
    data = dagster_dev.launch(["raw_fineweb", "token_shards"])
    assert dagster_dev.wait(data) == "SUCCESS", dagster_dev.log_tail()
    long_run = {"ops": {"pretrained_checkpoint": {"config": {"max_steps": INTERRUPTED_RUN_STEPS}}}}
    runs_dir = dagster_dev.artifacts / "pretrained_checkpoint" / "runs"
    run_id = dagster_dev.launch(["pretrained_checkpoint"], long_run)
    deadline = time.monotonic() + 180
    pids: list[int] = []
    while time.monotonic() < deadline:
        pids = training_processes(str(dagster_dev.artifacts))
        checkpoints = list(runs_dir.glob("*/model_*.pt")) if runs_dir.exists() else []
        if len(pids) >= 3 and checkpoints:
            break  # torchrun and both ranks are up, and this run has written a checkpoint
        time.sleep(0.5)
    assert len(pids) >= 3, "torchrun and two workers were running"
    dagster_dev.client.terminate_run(run_id)
    stopped = dagster_dev.wait(run_id, timeout=120)
    deadline = time.monotonic() + 30
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    survivors = [pid for pid in pids if is_alive(pid)]

    rerun = dagster_dev.launch(["pretrained_checkpoint"], long_run)
    resumed = dagster_dev.wait(rerun)
    resumed_from = None
    if resumed == "SUCCESS":
        with dagster_dev.instance() as instance:
            resumed_from = latest_event(instance, "pretrained_checkpoint").metadata["resumed_from"].value
    return InterruptedTraining(pids, stopped, survivors, resumed, resumed_from)


def test_terminating_a_training_run_kills_every_worker_and_the_next_run_resumes(interrupted_training):
    assert interrupted_training.stopped_status in ("CANCELED", "FAILURE")
    assert not interrupted_training.survivors, "no trainer process outlives the run"
    assert interrupted_training.resumed_status == "SUCCESS"
    assert interrupted_training.resumed_from and "model_" in interrupted_training.resumed_from


def test_the_asset_graph_in_the_ui_shows_every_asset(dagster_dev, tmp_path):
    screenshot = tmp_path / "dagster_asset_graph.png"
    with headless_chromium() as browser:
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
    assert not missing, f"asset graph lacks {missing}"
    assert screenshot.stat().st_size > 10_000
    update_docs_screenshot(screenshot, "dagster_asset_graph.png")


def test_the_report_card_reads_as_a_table_in_the_asset_page(dagster_dev, interrupted_training, tmp_path):
    """The resumed training's materialization carries a report card; the UI shows it as a table."""
    assert interrupted_training.resumed_status == "SUCCESS"
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1300})
        page.goto(f"{dagster_dev.url}/assets/pretrained_checkpoint", wait_until="networkidle", timeout=60_000)
        dismiss_welcome_dialog(page)
        page.get_by_placeholder("Filter metadata keys").fill("report_card")
        page.get_by_text("report_card_file").first.wait_for(timeout=30_000)
        # The UI shows short markdown in the table and longer markdown behind a button, in a dialog.
        show = page.get_by_text("[Show Markdown]")
        if show.count():
            show.first.click()
        row = page.locator("td", has_text="held-out loss (frozen set)").last
        row.wait_for(timeout=30_000)
        text = page.locator("table:has(td:text-is('held-out loss (frozen set)'))").last.inner_text()
        page.screenshot(path=str(tmp_path / "report_card.png"), full_page=True)
    for row in ("val loss (final / step 0)", "greedy replies", "tokens seen", "throughput", "raw content hash"):
        assert row in text
    assert "|" not in text  # rendered as a table, not shown as markdown source


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
