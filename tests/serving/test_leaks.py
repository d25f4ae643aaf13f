"""What the server keeps to itself: its file paths, its metrics when asked, and a failed model's engine.

In-process: a registry and a manifest watcher as the app uses them, and the app itself
(without its lifespan) where only the middlewares answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import httpx
import pytest

import serving.deployments
from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from nanogpt_core.report_card import FORMAT, card_beside
from serving.app import create_app
from serving.deployments import ManifestWatcher, ModelRegistry, initial_model
from serving.engine import Generation
from serving.sampling import SamplingParams
from serving.settings import ServerSettings, SettingsError
from tests.serving.conftest import make_checkpoint

FIRST, FAILING, UNREADABLE_CARD = "model_00701.pt", "model_00702.pt", "model_00703.pt"
ENGINE_THREADS = {f"nanogpt-{name}" for name in (FIRST, FAILING, UNREADABLE_CARD)}


def strings(value):
    """Every string in a JSON value, at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry serving FIRST, whose lineage (checkpoint, manifest) and report card all hold absolute paths."""
    root = tmp_path_factory.mktemp("leaks")
    checkpoint = make_checkpoint(root / "run" / FIRST, seed=71, step=701)
    card_beside(checkpoint).write_text(json.dumps({
        "format": FORMAT, "checkpoint": {"path": str(checkpoint), "name": FIRST},
        "runs": [{"log": str(root / "run" / "metrics.jsonl")}, "relative/file.txt"]}))
    manifest = root / "deployment" / "current.json"
    write_manifest(manifest, new_manifest(checkpoint_path=checkpoint, deployment_id="deploy-701",
                                          lineage={"data_dir": str(root / "data")}))
    settings = ServerSettings(manifest=manifest)
    registry = ModelRegistry(initial_model(settings))
    yield registry, ManifestWatcher(manifest, registry, settings), root
    registry.shutdown()


def answers(registry: ModelRegistry) -> str:
    async def ask():
        generation = Generation([15496, 11], SamplingParams(max_tokens=2, temperature=0))
        registry.resolve(None).engine.submit(generation)
        return [event async for event in generation.stream()]

    events = asyncio.run(ask())
    assert events[-1].finish_reason == "length"
    return registry.current.checkpoint_name


def engine_threads_alive(expected: int, timeout: float = 10.0) -> list[str]:
    """The engine threads of this module's models, once `expected` of them are left (a swapped-out
    engine ends when it has drained)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = sorted(t.name for t in threading.enumerate() if t.name in ENGINE_THREADS and t.is_alive())
        if len(alive) == expected or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_the_model_card_names_files_but_not_where_they_are(served):
    registry, _, root = served
    current = registry.current
    card = current.card("nanogpt").model_dump()
    assert not [s for s in strings(card) if s.startswith("/")], card
    assert card["lineage"]["checkpoint_path"] == FIRST and card["lineage"]["data_dir"] == "data"
    assert card["report_card"]["checkpoint"]["path"] == FIRST
    assert card["report_card"]["runs"] == [{"log": "metrics.jsonl"}, "relative/file.txt"]

    exposed = dataclasses.replace(current, expose_paths=True).card("nanogpt").model_dump()
    assert exposed["lineage"]["checkpoint_path"] == str((root / "run" / FIRST).resolve())
    assert exposed["report_card"]["checkpoint"]["path"] == str(root / "run" / FIRST)


def test_a_model_that_fails_after_its_engine_started_is_let_go_and_the_old_one_serves_on(served, monkeypatch,
                                                                                         caplog):
    registry, watcher, root = served
    before = registry.current.checkpoint_name
    engines = []

    class RecordedEngine(serving.deployments.Engine):
        def start(self):
            engines.append(self)
            return super().start()

    def broken_card(checkpoint: Path):
        raise RuntimeError("injected failure after the engine started")

    monkeypatch.setattr(serving.deployments, "Engine", RecordedEngine)
    monkeypatch.setattr(serving.deployments, "_report_card", broken_card)
    write_manifest(root / "deployment" / "current.json", new_manifest(
        checkpoint_path=make_checkpoint(root / "run" / FAILING, seed=72, step=702), deployment_id="deploy-702"))
    with caplog.at_level(logging.ERROR, logger="serving.deployments"):
        assert not watcher.check_now()
    assert "injected failure" in caplog.text and "deploy-702 failed to load" in caplog.text
    [failed] = engines
    assert failed.decoder is None  # its weights and cache are free
    assert engine_threads_alive(1) == [f"nanogpt-{before}"]
    assert answers(registry) == before


def test_a_report_card_that_is_not_text_is_left_out_and_the_swap_goes_ahead(served, caplog):
    registry, watcher, root = served
    checkpoint = make_checkpoint(root / "run" / "card" / UNREADABLE_CARD, seed=73, step=703)
    card_beside(checkpoint).write_bytes(b"\xff\xfe\x00not a card\x80")
    write_manifest(root / "deployment" / "current.json", new_manifest(
        checkpoint_path=checkpoint, deployment_id="deploy-703"))
    with caplog.at_level(logging.WARNING, logger="serving.deployments"):
        assert watcher.check_now()
    assert f"serving {checkpoint} without its report card" in caplog.text
    assert registry.current.report_card is None
    assert answers(registry) == UNREADABLE_CARD
    assert engine_threads_alive(1) == [f"nanogpt-{UNREADABLE_CARD}"]


def test_metrics_can_be_put_behind_the_api_key(tmp_path):
    with pytest.raises(SettingsError, match="no API key is configured"):
        ServerSettings(checkpoint=tmp_path / "m.pt", metrics_need_key=True)
    # Only the middlewares and the /metrics route answer here, so the app's lifespan (which
    # loads the model) is not needed.
    app = create_app(ServerSettings(checkpoint=tmp_path / "m.pt", api_keys=("sk-metrics",), metrics_need_key=True))

    async def scrape() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return [(await client.get("/metrics", headers=headers)).status_code
                    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Bearer sk-metrics"})]

    assert asyncio.run(scrape()) == [401, 401, 200]
    public = create_app(ServerSettings(checkpoint=tmp_path / "m.pt", api_keys=("sk-metrics",)))
    assert asyncio.run(_get(public, "/metrics")) == 200  # public unless asked otherwise


async def _get(app, path: str) -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        return (await client.get(path)).status_code
