"""`./dev demo`'s progress lines, read from Dagster's event log as `dagster asset materialize` writes it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from nanogpt_core.durations import format_duration
from pipeline.demo_progress import EXPECTED_PRETRAIN_STEP_S, EXPECTED_SECONDS, DemoProgress, follow

RUN = "76adaaf6-5f10-49ad-bbb0-711ea972f600"


def event(step: str, message: str, level: str = "DEBUG") -> str:
    pid = "29756 - " if level == "DEBUG" else ""
    return f"2026-12-01 02:05:41 +0000 - dagster - {level} - __ASSET_JOB - {RUN} - {pid}{step} - {message}\n"


def train_line(step: int, total: int, ms: float, eta: str) -> str:
    return (f"step {step:5d}/{total} | loss 6.123456 | lr 1.0000e-03 | norm 0.5000 | {ms:.0f} ms | 2000 tok/s | "
            f"mfu 10.0% | eta {eta}\n")


def test_a_line_per_asset_with_the_time_left_and_a_bar_while_training():
    out = io.StringIO()
    progress = DemoProgress(out)
    progress.feed(event("dolly_prompts", 'STEP_START - Started execution of step "dolly_prompts".'), now=0)
    progress.feed(event("dolly_prompts", 'STEP_SUCCESS - Finished execution of step "dolly_prompts" in 1.4s.'),
                  now=1.5)
    progress.feed(event("token_shards_shards_are_valid", "STEP_START - Started execution"), now=2)  # a check
    progress.feed(event("pretrained_checkpoint", "STEP_START - Started execution"), now=10)
    step_ms = 2000 * EXPECTED_PRETRAIN_STEP_S
    for step in range(100):
        progress.feed(train_line(step, 100, step_ms, "1m00s"), now=10 + step)
    # the trainer measured twice the budget machine's step time: the rest is expected to take twice as long
    assert progress.speed == pytest.approx(2.0)
    progress.feed(event("pretrained_checkpoint", "report card for model_00099.pt: held-out loss 5.4321 (9.1 s)",
                        level="INFO"), now=200)
    progress.feed(event("pretrained_checkpoint", "STEP_SUCCESS - Finished execution"), now=201)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/8] dolly_prompts") and "done in 2s" in lines[0]
    bars = [line for line in lines if "/100  loss" in line]  # in a log, not a terminal: one every tenth
    assert [bar.split("|")[2].split()[0] for bar in bars] == [f"{n}/100" for n in (1, *range(10, 101, 10))]
    assert bars[-1].endswith(f"|{'#' * 20}| 100/100  loss 6.12  {step_ms / 1000:.2f} s/step  eta 1m00s")
    later = round(2 * sum(EXPECTED_SECONDS[a] for a in EXPECTED_SECONDS
                          if a not in ("dolly_prompts", "pretrained_checkpoint")))
    assert lines[-1] == (f"[4/8] pretrained_checkpoint    done in {'3m11s':<8}   held-out loss 5.4321   about "
                         f"{format_duration(later)} left")
    progress.feed(event("RUN_SUCCESS", 'Finished execution of run for "__ASSET_JOB".'))
    assert progress.outcome == "success"


def test_a_failed_step_is_reported():
    progress = DemoProgress(io.StringIO())
    progress.feed(event("token_shards", "STEP_FAILURE - Execution of step failed."))
    assert progress.outcome.startswith("token_shards failed")


def test_the_log_is_followed_until_the_process_ends(tmp_path):
    log = tmp_path / "materialize.log"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        f"f = open({str(log)!r}, 'w')\n"
        f"for line in sys.argv[1:]:\n"
        "    f.write(line); f.flush(); time.sleep(0.2)\n"),
        event("hf_export", "STEP_START - Started"), event("hf_export", "STEP_SUCCESS - Finished"),
        event("RUN_SUCCESS", "Finished execution of run")])
    progress = DemoProgress(io.StringIO())
    follow(log, writer.pid, progress, poll_s=0.05)
    writer.wait()
    assert progress.outcome == "success" and "hf_export" in progress.finished
    assert not os.path.exists(f"/proc/{writer.pid}") or writer.returncode == 0


def test_ctrl_c_is_reported_as_an_interruption_not_a_failure(tmp_path):
    log = tmp_path / "materialize.log"
    log.write_text(event("dolly_prompts", "STEP_START - Started execution"))
    materialize = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    printer = subprocess.Popen([sys.executable, "-m", "pipeline.demo_progress", str(log), "--pid", str(materialize.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert printer.stdout.readline().startswith("Training the demo model")
        time.sleep(1)  # into the loop that follows the log
        printer.send_signal(signal.SIGINT)
        out, err = printer.communicate(timeout=30)
    finally:
        materialize.kill()
    assert printer.returncode == 130
    assert "Interrupted: the demo stopped before it finished; ./dev demo starts it again." in err
    assert "Traceback" not in err and "did not finish" not in err
