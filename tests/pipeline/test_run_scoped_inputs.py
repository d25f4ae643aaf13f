"""Which upstream output an asset reads when several runs go at once (pipeline.upstream).

Real runs on one real instance, overlapping in time: a run is held in flight by an asset that
waits for the test's signal, so the order of events is fixed rather than left to chance.
The assets here are small stand-ins that call the pipeline's own lookup.
"""


import threading

import dagster as dg
import pytest

from pipeline.upstream import EARLIER_RUN, THIS_RUN, latest_output

RELEASE: dict[str, threading.Event] = {}
WAITING: dict[str, threading.Event] = {}


class Label(dg.Config):
    label: str


class Hold(dg.Config):
    hold: str = ""  # when set, wait at the start until the test releases this name


@dg.asset
def upstream(context: dg.AssetExecutionContext, config: Label) -> dg.MaterializeResult:
    path = context.instance.root_directory + f"/upstream-{config.label}.txt"
    with open(path, "w") as f:
        f.write(config.label)
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(path)},
                                data_version=dg.DataVersion(config.label))


@dg.asset(deps=[upstream])
def consumer(context: dg.AssetExecutionContext, config: Hold) -> dg.MaterializeResult:
    if config.hold:
        WAITING[config.hold].set()
        assert RELEASE[config.hold].wait(60), "the test never released this run"
    used = latest_output(context, "upstream")
    return dg.MaterializeResult(metadata={"read": used.path.read_text()})


def run(instance, selection, upstream_label=None, hold=""):
    ops = {}
    if "consumer" in selection:
        ops["consumer"] = {"config": {"hold": hold}}
    if "upstream" in selection:
        ops["upstream"] = {"config": {"label": upstream_label}}
    return dg.materialize([upstream, consumer], selection=selection, instance=instance,
                          run_config={"ops": ops}).run_id


class HeldRun:
    """A run of upstream + consumer in a thread; the consumer waits until `release()`."""

    def __init__(self, instance, label: str):
        RELEASE[label], WAITING[label] = threading.Event(), threading.Event()
        self.label, self.run_id = label, None
        self.thread = threading.Thread(target=self._run, args=(instance,))
        self.thread.start()
        assert WAITING[label].wait(60), f"run {label} did not reach its consumer"

    def _run(self, instance):
        self.run_id = run(instance, ["upstream", "consumer"], self.label, hold=self.label)

    def release(self) -> str:
        RELEASE[self.label].set()
        self.thread.join(60)
        return self.run_id


def consumed(instance, run_id: str) -> tuple[str, dict]:
    """What the consumer of `run_id` read, and what it recorded about it."""
    entry = next(r.event_log_entry for r in instance.fetch_materializations(dg.AssetKey("consumer"), limit=20).records
                 if r.run_id == run_id)
    metadata = entry.asset_materialization.metadata
    return metadata["read"].value, metadata["input_upstream"].value


@pytest.fixture
def instance():
    # No compute-log capture: it mirrors output through `tail -F` subprocesses, whose clean-up
    # can take 30 s on a busy machine, longer than a held run is given to finish.
    no_compute_logs = {"compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager",
                                        "class": "NoOpComputeLogManager"}}
    with dg.instance_for_test(overrides=no_compute_logs) as instance:
        try:
            yield instance
        finally:  # a failed assertion must not leave a held run waiting
            for event in RELEASE.values():
                event.set()


def test_a_run_reads_its_own_upstream_even_when_another_run_wrote_a_newer_one(instance):
    held = HeldRun(instance, "mine")  # upstream "mine" materialized; its consumer waits
    run(instance, ["upstream"], "theirs")  # meanwhile another run writes a newer version
    run_id = held.release()
    read, record = consumed(instance, run_id)
    assert read == "mine"
    assert record["data_version"] == "mine" and record["run_id"] == run_id and record["produced_in"] == THIS_RUN


def test_without_its_own_a_run_reads_the_newest_output_of_a_run_that_has_ended(instance):
    finished = run(instance, ["upstream"], "finished")
    in_flight = HeldRun(instance, "in-flight")  # newer, but its run has not ended
    reader = run(instance, ["consumer"])
    read, record = consumed(instance, reader)
    assert read == "finished"
    assert record == {"data_version": "finished", "run_id": finished, "produced_in": EARLIER_RUN,
                      "path": record["path"]}
    in_flight.release()

    # Once that run has ended, its output is the newest settled one.
    read, _ = consumed(instance, run(instance, ["consumer"]))
    assert read == "in-flight"


def test_an_upstream_that_only_a_run_in_flight_has_made_is_refused_by_name(instance):
    held = HeldRun(instance, "only")
    result = dg.materialize([upstream, consumer], selection=["consumer"], instance=instance,
                            run_config={"ops": {"consumer": {"config": {"hold": ""}}}}, raise_on_error=False)
    held.release()
    assert not result.success
    message = next(str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure)
    assert "every recent output of upstream comes from a run still in flight" in message
    assert held.run_id in message
