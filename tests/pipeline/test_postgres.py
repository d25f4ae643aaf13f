"""The pipeline on a Dagster instance kept in PostgreSQL (dagster_home_postgres/).

A real `dagster-webserver` and a real `dagster-daemon` run as two processes, each with a
DAGSTER_HOME of its own: the only thing they share is the database, as on two machines.
A run is launched over the webserver's GraphQL, the daemon takes it off the queue, and the
whole micro graph materializes; lineage is then read back from PostgreSQL.

The server comes from NANOGPT_TEST_PG_URL (default: this machine's, trust auth); the tests
create a database of their own there and drop it afterwards. No server means a failure
that says how to point the tests at one, never a silent skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dagster as dg
import pytest
import yaml

from nanogpt_core.checkpoint import read_checkpoint
from tests.helpers.dagster_dev import DagsterServer, wait_until_serving
from tests.helpers.ports import free_port
from tests.helpers.processes import stop_process_group

from ..conftest import PROJECT_ROOT, python_env
from .conftest import ALL_ASSETS, latest_event

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_INSTANCE = PROJECT_ROOT / "dagster_home_postgres" / "dagster.yaml"
SQLITE_INSTANCE = PROJECT_ROOT / "dagster_home" / "dagster.yaml"
HOW_TO_POINT = ("set NANOGPT_TEST_PG_URL=postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE to a PostgreSQL server "
                "where USER may create databases (the tests create one of their own there and drop it afterwards)")


@dataclass(frozen=True)
class PgDatabase:
    host: str
    port: int
    user: str
    password: str
    name: str

    def instance_env(self) -> dict[str, str]:
        """The variables dagster_home_postgres/dagster.yaml reads its connection from."""
        return {"NANOGPT_DAGSTER_PG_HOST": self.host, "NANOGPT_DAGSTER_PG_PORT": str(self.port),
                "NANOGPT_DAGSTER_PG_USER": self.user, "NANOGPT_DAGSTER_PG_PASSWORD": self.password,
                "NANOGPT_DAGSTER_PG_DB": self.name}

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with contextlib.closing(psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                                 password=self.password, dbname=self.name)) as conn:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall()


def connect_admin(url: str):
    """A connection to the server behind `url`, or a test failure saying how to point at one."""
    import psycopg2

    try:
        conn = psycopg2.connect(url, connect_timeout=5)
    except psycopg2.Error as e:
        pytest.fail(f"cannot reach PostgreSQL at {url}: {str(e).strip()}\nTo run these tests, {HOW_TO_POINT}.",
                    pytrace=False)
    conn.autocommit = True  # CREATE and DROP DATABASE refuse to run inside a transaction
    return conn


@contextlib.contextmanager
def scratch_database(url: str) -> Iterator[PgDatabase]:
    """A new, empty database on the server behind `url`, dropped (connections and all) on exit."""
    conn = connect_admin(url)
    parts = urlsplit(url)
    name = f"nanogpt_test_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield PgDatabase(host=parts.hostname or "127.0.0.1", port=parts.port or 5432,
                         user=unquote(parts.username or "postgres"), password=unquote(parts.password or ""),
                         name=name)
    finally:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def test_an_unreachable_server_fails_with_directions_not_a_skip():
    closed_port = free_port()  # nothing listens there once the probe socket is closed
    with pytest.raises(pytest.fail.Exception) as failure:
        connect_admin(f"postgresql://postgres@127.0.0.1:{closed_port}/test")
    assert f"cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:{closed_port}/test" in str(failure.value)
    assert "NANOGPT_TEST_PG_URL=postgresql://" in str(failure.value)


def test_the_postgresql_instance_differs_from_the_embedded_one_only_in_storage():
    postgres, sqlite = (yaml.safe_load(path.read_text()) for path in (PG_INSTANCE, SQLITE_INSTANCE))
    assert set(postgres.pop("storage")) == {"postgres"}
    sqlite.pop("storage", None)
    assert postgres == sqlite


@dataclass
class TeamInstance:
    """A webserver and a daemon, each with its own DAGSTER_HOME, sharing one PostgreSQL database."""
    database: PgDatabase
    webserver: DagsterServer
    daemon_home: Path
    run_id: str
    run_status: str


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> Iterator[TeamInstance]:
    """The whole micro graph, launched through the webserver and run by the daemon, once per module."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    homes = {name: tmp_path_factory.mktemp(f"{name}_home") for name in ("webserver", "daemon")}
    bin_dir = Path(sys.executable).parent
    with scratch_database(os.environ.get("NANOGPT_TEST_PG_URL", DEFAULT_PG_URL)) as database, \
            pytest.MonkeyPatch.context() as patch:
        for key, value in database.instance_env().items():
            patch.setenv(key, value)  # for the instances this test process opens itself
        port = free_port()
        commands = {"webserver": [str(bin_dir / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
                                  "-p", str(port)],
                    "daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"]}
        processes = []
        try:
            for name, home in homes.items():
                shutil.copy(PG_INSTANCE, home / "dagster.yaml")
                env = {**python_env(), **database.instance_env(), "DAGSTER_HOME": str(home),
                       "NANOGPT_PROFILE": "micro", "NANOGPT_ARTIFACTS": str(artifacts)}
                # The log name is the one DagsterServer.log_tail reads.
                with open(home / "dagster_dev.log", "w") as log:
                    processes.append(subprocess.Popen(commands[name], cwd=PROJECT_ROOT, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT, start_new_session=True))
            webserver = DagsterServer(homes["webserver"], artifacts, port, processes[0])
            wait_until_serving(webserver, timeout=180)
            run_id = webserver.launch(ALL_ASSETS)
            status = webserver.wait(run_id)
            yield TeamInstance(database, webserver, homes["daemon"], run_id, status)
        finally:
            for process in processes:
                stop_process_group(process)


def daemon_log(team: TeamInstance) -> str:
    return (team.daemon_home / "dagster_dev.log").read_text()[-5000:]


@pytest.mark.slow
def test_the_whole_micro_graph_materializes_on_postgresql(team):
    assert team.run_status == "SUCCESS", team.webserver.log_tail() + daemon_log(team)
    with team.webserver.instance() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        for asset in ALL_ASSETS:
            latest_event(instance, asset)
    # The rows are in the database itself, and neither process kept a SQLite file beside it.
    materialized = {key for (key,) in team.database.query(
        "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")}
    assert {dg.AssetKey(a).to_string() for a in ALL_ASSETS} <= materialized
    assert team.database.query("SELECT run_id FROM runs") == [(team.run_id,)]
    for home in (team.webserver.home, team.daemon_home):
        assert not [p for p in home.rglob("*.db")], f"SQLite storage in {home}"


@pytest.mark.slow
def test_the_webserver_queues_and_the_daemon_dequeues_through_the_database(team):
    with team.webserver.instance() as instance:
        events = [record.event_log_entry for record in instance.get_records_for_run(team.run_id).records
                  if record.event_log_entry.is_dagster_event]
        kinds = [entry.dagster_event.event_type for entry in events]
        # The webserver only enqueues; RUN_STARTING is the daemon's word that it took the run off
        # the queue and launched it.
        enqueued, starting, started, succeeded = (kinds.index(kind) for kind in (
            dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING, dg.DagsterEventType.RUN_START,
            dg.DagsterEventType.RUN_SUCCESS))
        assert enqueued < starting < started < succeeded
        print(f"\nqueued {events[starting].timestamp - events[enqueued].timestamp:.1f} s, "
              f"ran {events[succeeded].timestamp - events[started].timestamp:.1f} s")
        # The daemon's heartbeats reach the webserver's instance only through PostgreSQL.
        assert "QUEUED_RUN_COORDINATOR" in instance.get_daemon_heartbeats()
    health = team.webserver.client._execute(
        "query { instance { daemonHealth { daemonStatus(daemonType: \"QUEUED_RUN_COORDINATOR\") { healthy } } } }")
    assert health["instance"]["daemonHealth"]["daemonStatus"]["healthy"] is True


@pytest.mark.slow
def test_the_lineage_query_answers_from_postgresql_which_shards_made_the_deployed_checkpoint(team):
    with team.webserver.instance() as instance:
        deployed = latest_event(instance, "deployed_model").metadata
        source, checkpoint = deployed["source_asset"].value, deployed["checkpoint"].value
        made_it = materialization_with_path(instance, source, checkpoint)
        if source == "finetuned_checkpoint":
            parent_version = made_it.metadata["upstream_pretrained_checkpoint_data_version"].value
            pretrained = materialization_with_version(instance, "pretrained_checkpoint", parent_version)
        else:
            pretrained = made_it
        shards_version = pretrained.metadata["upstream_token_shards_data_version"].value
        assert pretrained.tags["dagster/input_data_version/token_shards"] == shards_version
        materialization_with_version(instance, "token_shards", shards_version)  # that version is on record
    # The checkpoint file, read without Dagster, gives the same answer.
    lineage = read_checkpoint(checkpoint)["lineage"]
    assert shards_version == (lineage["parent_data_version"] if source == "finetuned_checkpoint"
                              else lineage["data_version"])


def materialization_with_path(instance: dg.DagsterInstance, asset: str, path: str) -> dg.AssetMaterialization:
    for record in instance.fetch_materializations(dg.AssetKey(asset), limit=100).records:
        if record.asset_materialization.metadata["path"].value == path:
            return record.asset_materialization
    raise AssertionError(f"no materialization of {asset} wrote {path}")


def materialization_with_version(instance: dg.DagsterInstance, asset: str, version: str) -> dg.AssetMaterialization:
    for record in instance.fetch_materializations(dg.AssetKey(asset), limit=100).records:
        if record.asset_materialization.tags.get("dagster/data_version") == version:
            return record.asset_materialization
    raise AssertionError(f"no materialization of {asset} has data version {version}")
