"""The trainer's progress display: time left from the measured step times, a bar when asked."""

from __future__ import annotations

import pytest

from nanogpt_core.durations import format_duration
from nanogpt_core.train import ProgressDisplay


def step(i: int, dt_ms: float) -> dict:
    return {"step": i, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "dt_ms": dt_ms, "tokens_per_sec": 1000.0,
            "mfu": 0.1}


def test_time_left_is_the_median_recent_step_time_times_the_steps_to_go(capsys, monkeypatch):
    monkeypatch.delenv("NANOGPT_PROGRESS_BAR", raising=False)
    display = ProgressDisplay(True, total=100, initial=0)
    for i, dt in enumerate([2000, 2000, 9000, 2000]):  # one slow (validating) step does not swing it
        display.update(step(i, dt))
    assert display.eta_seconds(3) == 2.0 * 96
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].endswith("| eta 3m12s")


def test_the_bar_is_drawn_when_asked_even_without_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("NANOGPT_PROGRESS_BAR", "1")
    display = ProgressDisplay(True, total=10, initial=0)
    display.update(step(0, 1500))
    display.close()
    out, err = capsys.readouterr()
    assert out == "" and "1/10" in err and "1.50 s/step, eta 14s" in err


def test_other_ranks_print_nothing(capsys):
    display = ProgressDisplay(False, total=10, initial=0)
    display.update(step(0, 1500))
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.4, "59s"), (60, "1m00s"), (3725, "62m05s")])
def test_durations_read_as_minutes_and_seconds(seconds, text):
    assert format_duration(seconds) == text
