"""A real `dagster dev` (webserver + daemon) on a loopback port, driven over GraphQL as the UI drives it.

Runs, sensors and their results are read back from the instance the server writes to.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster_graphql import DagsterGraphQLClient

from tests.conftest import PROJECT_ROOT, python_env
from tests.helpers.ports import free_port
from tests.helpers.processes import stop_process_group

RUN_TIMEOUT = 600
LOCATION = "pipeline.definitions"  # the code location workspace.yaml names
REPOSITORY = "__repository__"
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")

_START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { jobOriginId sensorState { selectorId status } }
    ... on PythonError { message }
    ... on SensorNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}"""

_STOP_SENSOR = """
mutation($origin: String, $selector: String) {
  stopSensor(jobOriginId: $origin, jobSelectorId: $selector) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}"""


class DagsterServer:
    def __init__(self, home: Path, artifacts: Path, port: int, process: subprocess.Popen):
        self.home, self.artifacts, self.port, self.process = home, artifacts, port, process
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        self.url = f"http://127.0.0.1:{port}"
        self._sensor_ids: dict[str, tuple[str, str]] = {}

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def log_tail(self, characters: int = 5000) -> str:
        return (self.home / "dagster_dev.log").read_text()[-characters:]

    def launch(self, assets: list[str], run_config: dict | None = None) -> str:
        return self.client.submit_job_execution("__ASSET_JOB", asset_selection=assets, run_config=run_config or {})

    def submit(self, job: str, run_config: dict, tags: dict[str, str] | None = None) -> str:
        return self.client.submit_job_execution(job, run_config=run_config, tags=tags or {})

    def status(self, run_id: str) -> str:
        return self.client.get_run_status(run_id).value

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status in FINISHED:
                return status
            time.sleep(1)
        raise TimeoutError(f"run {run_id} still running after {timeout} s")

    def start_sensor(self, name: str, timeout: float = 60) -> None:
        """Switch a sensor on as the UI's toggle does; retried while the code location still loads."""
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "sensorName": name}
        deadline = time.monotonic() + timeout
        while True:
            result = self.client._execute(_START_SENSOR, {"selector": selector})["startSensor"]
            if result["__typename"] == "Sensor" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert result["__typename"] == "Sensor", result
        self._sensor_ids[name] = (result["jobOriginId"], result["sensorState"]["selectorId"])

    def stop_sensor(self, name: str) -> None:
        origin, selector = self._sensor_ids[name]
        result = self.client._execute(_STOP_SENSOR, {"origin": origin, "selector": selector})["stopSensor"]
        assert result["__typename"] == "StopSensorMutationResult", result


def wait_until_serving(server: DagsterServer, timeout: float) -> None:
    """Return once the webserver answers; fail with its log if it exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/server_info", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline or server.process.poll() is not None:
                raise RuntimeError(f"the Dagster webserver on port {server.port} did not come up:\n"
                                   + server.log_tail()) from None
            time.sleep(1)


@contextlib.contextmanager
def run_dagster_dev(home: Path, artifacts: Path, env: dict[str, str] | None = None) -> Iterator[DagsterServer]:
    """`dagster dev -w workspace.yaml` with the project's dagster.yaml, on the micro profile."""
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    full_env = {**python_env(), "DAGSTER_HOME": str(home), "NANOGPT_PROFILE": "micro",
                "NANOGPT_ARTIFACTS": str(artifacts), **(env or {})}
    log = open(home / "dagster_dev.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)], cwd=PROJECT_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    server = DagsterServer(home, artifacts, port, process)
    try:
        wait_until_serving(server, timeout=120)
        yield server
    finally:
        stop_process_group(process)
        log.close()
