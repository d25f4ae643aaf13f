"""Real gunicorn with two uvicorn workers, started the way production starts it.

One server (`gunicorn --config gunicorn_config.py serving.app:app`) is shared by the tests
that leave it running; the shutdown test starts its own, with the no-argument form
(`gunicorn -c gunicorn_config.py`), and the last test shows that a single `python -m serving`
process drains the same way. Workers are told apart by the `x-worker-pid` header,
and the test knows which workers exist from the master's children in /proc.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from nanogpt_core.checkpoint import save_checkpoint
from nanogpt_core.model import GPT, GPTConfig
from serving.drain import SHUTTING_DOWN_CODE
from serving.gunicorn_worker import WORKER_PID_HEADER
from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from tests.helpers.ports import free_port
from tests.serving.conftest import API_KEYS, ServerProcess, make_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                                   reason="reads a process's children from Linux /proc")]

GRACEFUL_TIMEOUT_S = 4
AUTH = {"Authorization": f"Bearer {API_KEYS[0]}"}
MESSAGES = [{"role": "user", "content": "Say something."}]
NO_END_OF_TEXT = {"50256": -100}  # so that a long stream runs to its token limit


@dataclass
class GunicornProcess(ServerProcess):
    app_argument: bool = True  # `... serving.app:app`, or rely on the config's default app

    def command(self) -> list[str]:
        app = ["serving.app:app"] if self.app_argument else []
        return [sys.executable, "-m", "gunicorn", "--config", "gunicorn_config.py", *app]

    @property
    def master_pid(self) -> int:
        return self.process.pid

    def worker_pids(self) -> set[int]:
        children = Path(f"/proc/{self.master_pid}/task/{self.master_pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def wait_for_workers(self, count: int, replacing: set[int] = frozenset(), timeout: float = 90.0) -> set[int]:
        """Until `count` workers, none of them among `replacing`, have loaded the model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.worker_pids()
            if len(workers) == count and not workers & replacing and all(self._serving(pid) for pid in workers):
                return workers
            time.sleep(0.2)
        raise AssertionError(f"{count} workers did not come up within {timeout} s:\n{self.log()}")

    def _serving(self, pid: int) -> bool:
        return f"[{pid}] [INFO] Application startup complete" in self.log_path.read_text()


def start_gunicorn(root: Path, checkpoint: Path, *, app_argument: bool = True) -> tuple[GunicornProcess, Path]:
    manifest = root / "deployment" / "current.json"
    write_manifest(manifest, new_manifest(checkpoint_path=checkpoint, deployment_id="deploy-1"))
    port = free_port()
    server = GunicornProcess(args=[], log_path=root / "gunicorn.log", port=port, app_argument=app_argument, env={
        "NANOGPT_MANIFEST": str(manifest), "NANOGPT_API_KEYS": ",".join(API_KEYS),
        "NANOGPT_BIND": f"127.0.0.1:{port}", "NANOGPT_WORKERS": "2", "NANOGPT_THREADS": "1",
        "NANOGPT_MAX_BATCH": "4", "NANOGPT_POLL_INTERVAL": "0.2",
        "NANOGPT_GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT_S), "PROMETHEUS_MULTIPROC_DIR": str(root / "metrics")})
    server.start(timeout=90)
    server.wait_for_workers(2)
    return server, manifest


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory):
    root = tmp_path_factory.mktemp("gunicorn")
    stale = leave_metrics_of_an_earlier_run(root / "metrics")
    server, manifest = start_gunicorn(root, make_checkpoint(root / "run" / "model_00001.pt", seed=1, step=1))
    server.manifest = manifest
    server.stale_metrics = stale
    yield server
    server.stop()


def leave_metrics_of_an_earlier_run(metrics_dir: Path) -> Path:
    """A counter file as a worker of an earlier server would have left it, 1000 requests strong."""
    metrics_dir.mkdir(parents=True)
    script = ("from prometheus_client import Counter; import os; "
              "Counter('nanogpt_requests', '', ['endpoint', 'status']).labels('/v1/models', '200').inc(1000); "
              "print(os.getpid())")
    pid = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
                         capture_output=True, text=True, check=True).stdout.strip()
    stale = metrics_dir / f"counter_{pid}.db"
    assert stale.exists()
    return stale


def worker_of(response: httpx.Response) -> int:
    return int(response.headers[WORKER_PID_HEADER])


def chat(server: ServerProcess, **fields) -> httpx.Response:
    # A fresh connection per request: the kernel then hands each one to whichever worker accepts first.
    body = {"model": "nanogpt", "messages": MESSAGES, "max_tokens": 8, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)


@dataclass
class StreamResult:
    worker: int | None
    events: list[str]  # the data of each SSE event, "[DONE]" included
    ended_at: float  # time.monotonic() when the body ended


def stream_completion(server: ServerProcess, max_tokens: int, first_token: threading.Event | None = None,
                      ) -> StreamResult:
    body = {"model": "nanogpt", "prompt": "Once", "max_tokens": max_tokens, "stream": True,
            "logit_bias": NO_END_OF_TEXT}
    events = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if first_token is not None:
                    first_token.set()
        worker = response.headers.get(WORKER_PID_HEADER)  # None from a server without gunicorn
        return StreamResult(int(worker) if worker else None, events, time.monotonic())


def finish_reason(result: StreamResult) -> str | None:
    """How a complete stream ended: its finish reason, or the error code of its final event."""
    if len(result.events) < 2 or result.events[-1] != "[DONE]":
        return None
    last = json.loads(result.events[-2])
    if "error" in last:
        return last["error"]["code"]
    return last["choices"][0]["finish_reason"]


def scrape(server: ServerProcess) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


MODELS_OK = ("nanogpt_requests_total", (("endpoint", "/v1/models"), ("status", "200")))


def test_both_workers_answer(gunicorn):
    workers = gunicorn.worker_pids()
    assert len(workers) == 2
    answers: dict[int, dict] = {}
    for _ in range(200):
        response = chat(gunicorn)
        assert response.status_code == 200, response.text
        answers[worker_of(response)] = response.json()
        if set(answers) == workers:
            break
    assert set(answers) == workers
    for answer in answers.values():
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        assert answer["usage"]["completion_tokens"] >= 1


def test_metrics_add_up_every_workers_requests(gunicorn):
    assert not gunicorn.stale_metrics.exists()  # wiped at start, so an earlier run's counts are gone
    before = scrape(gunicorn).get(MODELS_OK, 0.0)
    by_worker: dict[int, int] = {}
    while len(by_worker) < 2 or sum(by_worker.values()) < 20:
        response = httpx.get(gunicorn.url + "/v1/models", headers=AUTH, timeout=10)
        assert response.status_code == 200
        by_worker[worker_of(response)] = by_worker.get(worker_of(response), 0) + 1
        assert sum(by_worker.values()) < 400, f"one worker took every request: {by_worker}"
    samples = scrape(gunicorn)  # answered by one worker, counting both
    assert samples[MODELS_OK] - before == sum(by_worker.values())
    assert samples[MODELS_OK] < 1000
    # Gauges are one sum over the live workers, not one series per worker.
    assert [key for key in samples if key[0] == "nanogpt_queue_depth"] == [("nanogpt_queue_depth", ())]


def test_a_forwarded_address_is_not_believed_without_a_named_proxy(gunicorn):
    """Gunicorn's own default would believe X-Forwarded-For from 127.0.0.1; the access log shows
    who the workers took the client to be."""
    for probe in range(4):  # a fresh connection each, so that both workers are likely asked
        response = httpx.get(f"{gunicorn.url}/health?forwarded-probe={probe}", timeout=10,
                             headers={"X-Forwarded-For": "203.0.113.9"})
        assert response.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        logged = [line for line in gunicorn.log_path.read_text().splitlines() if "forwarded-probe=" in line]
        if len(logged) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(logged) == 4 and all("127.0.0.1:" in line and "203.0.113.9" not in line for line in logged), logged


def test_a_manifest_swap_reaches_every_worker(gunicorn):
    new_checkpoint = make_checkpoint(gunicorn.manifest.parent.parent / "run" / "model_00002.pt", seed=2, step=2)
    write_manifest(gunicorn.manifest, new_manifest(checkpoint_path=new_checkpoint, deployment_id="deploy-2"))
    workers = gunicorn.worker_pids()
    serving: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while not (set(serving) == workers and set(serving.values()) == {"deploy-2"}):
        assert time.monotonic() < deadline, f"not every worker swapped: {serving}"
        response = httpx.get(gunicorn.url + "/health", timeout=10)
        serving[worker_of(response)] = response.json()["deployment_id"]
    for _ in range(10):
        assert chat(gunicorn).status_code == 200


def test_sighup_rotates_the_workers_without_a_failed_request(gunicorn):
    old_workers = gunicorn.worker_pids()
    answered_by: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def keep_asking(streaming: bool) -> None:
        while not stop.is_set():
            try:
                if streaming:
                    result = stream_completion(gunicorn, max_tokens=40)
                    if finish_reason(result) != "length":
                        failures.append(f"stream ended with {result.events[-2:]}")
                    answered_by.append(result.worker)
                else:
                    response = chat(gunicorn)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code}: {response.text}")
                    answered_by.append(worker_of(response))
            except (httpx.HTTPError, AssertionError) as e:
                failures.append(repr(e))

    clients = [threading.Thread(target=keep_asking, args=(streaming,)) for streaming in (False, False, True)]
    for client in clients:
        client.start()
    try:
        time.sleep(1.0)
        os.kill(gunicorn.master_pid, signal.SIGHUP)
        new_workers = gunicorn.wait_for_workers(2, replacing=old_workers)
        deadline = time.monotonic() + 30
        while not new_workers <= set(answered_by) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=60)
    assert not failures, failures
    assert new_workers.isdisjoint(old_workers)
    assert new_workers <= set(answered_by), "the new workers did not take over"
    assert set(answered_by) & old_workers, "no request reached the old workers before the rotation"


def long_context_checkpoint(path: Path) -> Path:
    """A model small enough to load fast, with room for streams longer than the graceful timeout."""
    torch.manual_seed(3)
    config = GPTConfig(block_size=8192, n_layer=2, n_head=4, n_embd=64)
    return save_checkpoint(path, GPT(config), step=1, lineage={"git_commit": "0" * 40}, metrics={})


def test_sigterm_drains_streams_within_graceful_timeout_and_refuses_new_connections(tmp_path):
    server, _ = start_gunicorn(tmp_path, long_context_checkpoint(tmp_path / "run" / "model_00001.pt"),
                               app_argument=False)
    try:
        first_tokens = [threading.Event() for _ in range(4)]
        results: list[StreamResult | Exception] = []

        def stream(first_token: threading.Event) -> None:
            try:
                # 8000 tokens take far longer than the graceful timeout: these are cut by the drain.
                results.append(stream_completion(server, max_tokens=8000, first_token=first_token))
            except Exception as e:
                results.append(e)

        clients = [threading.Thread(target=stream, args=(event,)) for event in first_tokens]
        for client in clients:
            client.start()
        assert all(event.wait(timeout=60) for event in first_tokens)
        terminated_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        time.sleep(0.5)
        assert server.process.poll() is None and any(client.is_alive() for client in clients)  # still draining
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()

        for client in clients:
            client.join(timeout=GRACEFUL_TIMEOUT_S + 10)
        server.process.wait(timeout=GRACEFUL_TIMEOUT_S + 10)
        exited_at = time.monotonic()
    finally:
        server.stop()

    assert server.process.returncode == 0, server.log()
    assert exited_at - terminated_at < GRACEFUL_TIMEOUT_S, server.log()
    assert "SIGKILL" not in server.log_path.read_text()
    assert len(results) == 4 and all(isinstance(r, StreamResult) for r in results), results
    endings = [finish_reason(r) for r in results]
    # Each stream either finished or was ended with a final error event, then [DONE].
    assert all(ending in ("length", SHUTTING_DOWN_CODE) for ending in endings), endings
    assert SHUTTING_DOWN_CODE in endings
    assert all(r.ended_at - terminated_at < GRACEFUL_TIMEOUT_S for r in results)


def test_a_single_process_server_drains_its_streams_the_same_way_on_sigterm(tmp_path):
    # `python -m serving` has no gunicorn around it; it takes its drain deadline from --graceful-timeout.
    checkpoint = long_context_checkpoint(tmp_path / "run" / "model_00001.pt")
    server = ServerProcess(args=["--checkpoint", str(checkpoint), "--threads", "1",
                                 "--graceful-timeout", str(GRACEFUL_TIMEOUT_S)],
                           env={"NANOGPT_API_KEYS": ",".join(API_KEYS)}, log_path=tmp_path / "server.log").start()
    try:
        first_token = threading.Event()
        results: list[StreamResult | Exception] = []

        def stream() -> None:
            try:
                results.append(stream_completion(server, max_tokens=8000, first_token=first_token))
            except Exception as e:
                results.append(e)

        client = threading.Thread(target=stream)
        client.start()
        assert first_token.wait(timeout=60)
        terminated_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        client.join(timeout=GRACEFUL_TIMEOUT_S + 10)
        server.process.wait(timeout=GRACEFUL_TIMEOUT_S + 10)
        exited_at = time.monotonic()
    finally:
        server.stop()

    assert exited_at - terminated_at < GRACEFUL_TIMEOUT_S, server.log()
    assert len(results) == 1 and isinstance(results[0], StreamResult), results
    assert finish_reason(results[0]) == SHUTTING_DOWN_CODE, results[0].events[-3:]
