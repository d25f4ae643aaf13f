"""Progress of `./dev demo`: a short line per asset, a bar while a model trains, and the time left.

`./dev demo` sends Dagster's full event log to a file (it is long: every event, every step's
metrics) and runs this beside it, which follows the file and prints what a person waiting wants
to know:

    [1/8] dolly_prompts            done in 1.4 s       about 8m40s left
    [4/8] pretrained_checkpoint    |#########-----------| 60/130  loss 6.12  2.10 s/step  eta 2m27s
    [4/8] pretrained_checkpoint    done in 4m31s       held-out loss 5.43   about 3m10s left

The time left is the expected time of the assets still to run, measured on the demo's budget
machine (EXPECTED_SECONDS, docs/BENCHMARKS.md), scaled by how this machine's measured
pretraining step time compares with the budget machine's; while a model trains, its own
remaining steps times its measured step time replace that asset's share.

    python -m pipeline.demo_progress LOG --pid PID    # until process PID has exited and LOG is read
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TextIO

from nanogpt_core.durations import format_duration

# Assets in the order the in-process demo run materializes them, with their seconds on the
# 2-core AVX2 machine the demo profile is budgeted for (docs/BENCHMARKS.md, "Demo profile").
EXPECTED_SECONDS: dict[str, float] = {
    "dolly_prompts": 1, "raw_fineweb": 9, "token_shards": 1, "pretrained_checkpoint": 405,
    "finetuned_checkpoint": 81, "hellaswag_scores": 20, "deployed_model": 1, "hf_export": 2,
}
EXPECTED_PRETRAIN_STEP_S = 1.74
EVENT = re.compile(r" - dagster - (?P<level>[A-Z]+) - [^ ]+ - [0-9a-f-]{36} - (?:\d+ - )?(?P<step>[^ ]+) - "
                   r"(?P<message>.*)$")
TRAIN_LINE = re.compile(r"^step\s+(?P<step>\d+)/(?P<total>\d+) \| loss (?P<loss>[\d.]+).*\| (?P<ms>[\d.]+) ms \|.*"
                        r"\| eta (?P<eta>\S+)$")
CARD = re.compile(r"report card for [^:]+: (?P<summary>[^(]+)")
BAR_WIDTH = 20


class DemoProgress:
    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self.tty = out.isatty()
        self.started_at: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.current: str | None = None
        self.card: dict[str, str] = {}
        self.speed = 1.0  # this machine's step time over the budget machine's, once measured
        self.training: tuple[int, int, float] | None = None  # step, total, measured seconds a step
        self.last_printed_tenth = -1
        self.outcome: str | None = None  # "success" or the failure's message

    def feed(self, line: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        line = line.rstrip("\n")
        train = TRAIN_LINE.match(line)
        if train:
            self._training_step(int(train["step"]), int(train["total"]), float(train["loss"]),
                                float(train["ms"]) / 1000, train["eta"])
            return
        event = EVENT.search(line)
        if not event:
            return
        step, message = event["step"], event["message"]
        if step == "RUN_SUCCESS":
            self.outcome = "success"
        elif step == "RUN_FAILURE":
            self.outcome = self.outcome or message
        elif step not in EXPECTED_SECONDS:
            return  # an asset check or another step: part of its asset's time
        elif message.startswith("STEP_START"):
            self._start(step, now)
        elif message.startswith("STEP_SUCCESS"):
            self._finish(step, now)
        elif message.startswith("STEP_FAILURE"):
            self.outcome = f"{step} failed: {message}"
            self._print(f"[{self._index(step)}/{len(EXPECTED_SECONDS)}] {step:<24} FAILED")
        elif card := CARD.search(message):
            self.card[step] = card["summary"].strip()

    def remaining_seconds(self, now: float) -> float:
        """The expected time of the assets not finished yet, scaled to this machine's speed."""
        left = 0.0
        for asset, expected in EXPECTED_SECONDS.items():
            if asset in self.finished:
                continue
            if asset == self.current and self.training is not None:
                step, total, step_s = self.training
                left += (total - step - 1) * step_s  # what the trainer measured, not the expectation
            elif asset == self.current:
                left += max(0.0, expected * self.speed - (now - self.started_at[asset]))
            else:
                left += expected * self.speed
        return left

    def _index(self, asset: str) -> int:
        return list(EXPECTED_SECONDS).index(asset) + 1

    def _start(self, asset: str, now: float) -> None:
        self.current = asset
        self.started_at[asset] = now
        self.training = None
        self.last_printed_tenth = -1

    def _finish(self, asset: str, now: float) -> None:
        took = now - self.started_at.get(asset, now)
        self.finished[asset] = took
        self.current, self.training = None, None
        extra = f"   {self.card[asset]}" if asset in self.card else ""
        self._print(f"[{self._index(asset)}/{len(EXPECTED_SECONDS)}] {asset:<24} done in {format_duration(took):<8}"
                    f"{extra}   about {format_duration(self.remaining_seconds(now))} left")

    def _training_step(self, step: int, total: int, loss: float, step_s: float, eta: str) -> None:
        if self.current is None:
            return
        measured = step_s if self.training is None else 0.8 * self.training[2] + 0.2 * step_s
        self.training = (step, total, measured)
        if self.current == "pretrained_checkpoint":
            self.speed = measured / EXPECTED_PRETRAIN_STEP_S
        done = (step + 1) / total
        filled = int(done * BAR_WIDTH)
        text = (f"[{self._index(self.current)}/{len(EXPECTED_SECONDS)}] {self.current:<24} "
                f"|{'#' * filled}{'-' * (BAR_WIDTH - filled)}| {step + 1}/{total}  loss {loss:.2f}  "
                f"{step_s:.2f} s/step  eta {eta}")
        if self.tty:
            self.out.write("\r" + text + "\033[K")
            self.out.flush()
        elif int(done * 10) > self.last_printed_tenth:  # a log: a line every tenth of the steps
            self.last_printed_tenth = int(done * 10)
            self._print(text)

    def _print(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.out.flush()


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def follow(log: Path, pid: int | None, progress: DemoProgress, poll_s: float = 0.5) -> None:
    """Feed every line of `log` to `progress` as it is written, until process `pid` has exited."""
    while not log.exists():
        if pid is not None and not _alive(pid):
            return
        time.sleep(poll_s)
    with log.open(errors="replace") as f:
        pending = ""
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    progress.feed(pending)
                    pending = ""
                continue
            if pid is None or not _alive(pid):
                if pending:
                    progress.feed(pending)
                return
            time.sleep(poll_s)


def _alive(pid: int) -> bool:
    """Whether the process is still running; one that has exited but not been reaped yet is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_progress", description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the output of `dagster asset materialize`")
    parser.add_argument("--pid", type=int, help="follow the log until this process has exited")
    args = parser.parse_args(argv)
    progress = DemoProgress()
    print(f"Training the demo model: {len(EXPECTED_SECONDS)} assets, about "
          f"{format_duration(sum(EXPECTED_SECONDS.values()))} on a 2-core AVX2 CPU (full log: {args.log})", flush=True)
    try:
        follow(args.log, args.pid, progress)
    except KeyboardInterrupt:
        # Ctrl-C reaches the materialization too (one process group); say so plainly, and exit
        # with the shell's code for an interrupt so that ./dev does not report it as a failure.
        print("\nInterrupted: the demo stopped before it finished; ./dev demo starts it again.",
              file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    if progress.outcome != "success":
        sys.exit(f"the demo pipeline did not finish: {progress.outcome or 'the run ended without a result'}; "
                 f"see {args.log}")


if __name__ == "__main__":
    main()
