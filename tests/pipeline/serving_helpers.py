"""A real server following a pipeline's deployment manifest, and a client that never stops asking."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.serving.conftest import ServerProcess

CHAT = "/v1/chat/completions"
ASK = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def serve_manifest(manifest: Path, log_path: Path) -> ServerProcess:
    """`python -m serving --manifest ...` on loopback (no key needed), polling the manifest often."""
    return ServerProcess(args=["--manifest", str(manifest), "--threads", "1", "--poll-interval", "0.2"],
                         env={}, log_path=log_path).start()


def wait_for_deployment(server: ServerProcess, deployment_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    health = server.health()
    while health["deployment_id"] != deployment_id and time.monotonic() < deadline:
        time.sleep(0.2)
        health = server.health()
    assert health["deployment_id"] == deployment_id, server.log()
    return health


def still_serving(server: ServerProcess, deployment_id: str, settle_s: float = 1.5) -> dict:
    """The deployment after several poll intervals: long enough for a changed manifest to be seen."""
    time.sleep(settle_s)
    health = server.health()
    assert health["deployment_id"] == deployment_id, server.log()
    return health


class SteadyTraffic:
    """Chat requests one after another from a background thread, for as long as the block runs.

    Every response that is not a 200 with a completion, and every transport error, is kept in
    `failures`; `answered` counts the good ones.
    """

    def __init__(self, server: ServerProcess):
        self.server = server
        self.failures: list[str] = []
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadyTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for_more_answers(self, count: int, timeout: float = 60.0) -> None:
        """Block until `count` more requests have been answered (by whatever is served now)."""
        target = self.answered + count
        deadline = time.monotonic() + timeout
        while self.answered < target and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.answered >= target, (self.answered, self.failures[:5], self.server.log())

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as http:
            while not self._stop.is_set():
                try:
                    response = http.post(CHAT, json=ASK)
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                if response.status_code == 200 and response.json().get("choices"):
                    self.answered += 1
                else:
                    self.failures.append(f"{response.status_code}: {response.text[:300]}")
