"""Which model the server is serving, and switching to a new deployment without failing a request.

A `ServedModel` is a loaded checkpoint with its own engine. The `ModelRegistry` holds the
current one; `install` makes a new one current in a single assignment, so every request
that arrives afterwards goes to the new engine, while the old engine stops taking work,
finishes the requests it already accepted, and is then let go. The `ManifestWatcher`
polls the deployment manifest and installs each new deployment it names.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from nanogpt_core.checkpoint import CheckpointError, load_checkpoint
from nanogpt_core.deployment_manifest import Manifest, ManifestError, read_manifest
from nanogpt_core.report_card import ReportCardError, card_beside, read_card
from serving.engine import Engine, EngineMetrics
from serving.errors import model_not_found, model_replaced
from serving.kv_decoder import BatchDecoder
from serving.linear_layouts import TimedLayouts
from serving.schemas import ModelCard
from serving.settings import ServerSettings

log = logging.getLogger("serving.deployments")


@dataclass
class ServedModel:
    model_id: str  # the stable alias, e.g. "nanogpt"
    checkpoint_name: str  # e.g. "model_00599.pt"; also accepted as a model name
    checkpoint_path: str
    engine: Engine
    context_length: int
    created: int
    weights: str = "fp32"
    weight_layouts: dict[str, str] = field(default_factory=dict)
    timed_layouts: TimedLayouts | None = None  # handed to the next model of the same shape
    step: int | None = None
    deployment_id: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] | None = None
    deployed_at: str | None = None
    report_card: dict[str, Any] | None = None
    expose_paths: bool = False  # card() shows absolute server paths as they are

    @property
    def names(self) -> tuple[str, str]:
        return self.model_id, self.checkpoint_name

    def card(self, name: str) -> ModelCard:
        provenance = {"lineage": {"step": self.step, "checkpoint_path": self.checkpoint_path, **self.lineage},
                      "scores": self.scores, "report_card": self.report_card}
        if not self.expose_paths:
            provenance = file_names_only(provenance)
        return ModelCard(id=name, created=self.created, checkpoint=self.checkpoint_name,
                         context_length=self.context_length, weights=self.weights,
                         weight_layouts=self.weight_layouts, deployment_id=self.deployment_id,
                         deployed_at=self.deployed_at, **provenance)


def file_names_only(value: Any) -> Any:
    """`value` with every string that is an absolute path cut to its last component, at any depth.

    The lineage, the manifest and the report card record where the pipeline wrote things on the
    server (a home directory, a user name, the layout of the artifact store); a client that may
    list models needs the file's name to tell checkpoints apart, not where it sits.
    """
    if isinstance(value, str):
        return PurePosixPath(value).name if value.startswith("/") else value
    if isinstance(value, dict):
        return {key: file_names_only(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [file_names_only(item) for item in value]
    return value


def load_served_model(checkpoint_path: str | Path, settings: ServerSettings, *,
                      metrics: EngineMetrics | None = None, manifest: Manifest | None = None,
                      timed_before: TimedLayouts | None = None) -> ServedModel:
    """Load a checkpoint and start an engine for it (with `timed_before`'s single-row layouts
    where the model has the same shapes; see TimedLayouts)."""
    path = Path(checkpoint_path)
    started = time.monotonic()
    model, payload = load_checkpoint(path, map_location=settings.device)
    model.eval()
    name = manifest.checkpoint_name if manifest else path.name
    # Built in the engine's thread, where its products run faster (see Engine).
    one_row = None if settings.single_row_layout == "timed" else settings.single_row_layout
    engine = Engine(functools.partial(BatchDecoder, model, settings.max_batch, weights=settings.weights,
                                      one_row=one_row, timed_before=timed_before),
                    max_queue=settings.max_queue, prefill_chunk=settings.prefill_chunk,
                    metrics=metrics, name=name).start()
    del model  # the decoder keeps its own copies of the weights it needs
    try:
        return _served(engine, path, payload, name, settings, manifest, started)
    except BaseException:
        # A model that is not installed must not keep its engine thread and its weights: after a
        # failed swap the server would otherwise hold two models for as long as it runs.
        engine.stop()
        engine.decoder = None
        raise


def _served(engine: Engine, path: Path, payload: dict[str, Any], name: str, settings: ServerSettings,
            manifest: Manifest | None, started: float) -> ServedModel:
    decoder = engine.decoder
    reused = " (as timed for the previous model of this shape)" if decoder.reused_timed_layouts else ""
    log.info("loaded %s in %.1f s (%s weights%s)", path, time.monotonic() - started, decoder.weights,
             f"; single rows through {decoder.one_row_layouts}{reused}" if decoder.one_row_layouts else "")
    lineage = dict(payload.get("lineage") or {})
    if payload.get("metrics"):
        lineage.setdefault("metrics", payload["metrics"])
    if manifest is not None:
        lineage.update(manifest.lineage)
    return ServedModel(
        model_id=manifest.model_id if manifest else settings.model_id,
        checkpoint_name=name,
        checkpoint_path=str(path.resolve()),
        engine=engine,
        context_length=decoder.max_len,
        weights=decoder.weights,
        weight_layouts=dict(decoder.one_row_layouts),
        timed_layouts=decoder.timed_layouts,
        created=_timestamp(payload.get("created")) or int(path.stat().st_mtime),
        step=payload.get("step"),
        deployment_id=manifest.deployment_id if manifest else None,
        lineage=lineage,
        scores=manifest.scores if manifest else None,
        deployed_at=manifest.deployed_at if manifest else None,
        report_card=_report_card(path),
        expose_paths=settings.expose_paths,
    )


def _report_card(checkpoint: Path) -> dict[str, Any] | None:
    """The card the pipeline wrote beside the checkpoint; a checkpoint without one is served all the same."""
    if not card_beside(checkpoint).is_file():
        return None
    try:
        return read_card(card_beside(checkpoint))
    except (ReportCardError, ValueError) as e:  # ValueError: a file that is not UTF-8 text
        log.warning("serving %s without its report card: %s", checkpoint, e)
        return None


def _timestamp(iso: Any) -> int | None:
    try:
        return int(datetime.fromisoformat(str(iso)).timestamp())
    except ValueError:
        return None


class ModelRegistry:

    def __init__(self, current: ServedModel):
        self._current = current
        self._retiring: list[ServedModel] = []
        # Names served before a swap, so that a client pinned to one learns what replaced it.
        self._replaced_names: set[str] = set()
        self._lock = threading.Lock()

    @property
    def current(self) -> ServedModel:
        return self._current

    def resolve(self, name: str | None) -> ServedModel:
        current = self._current
        if name is None or name in current.names:
            return current
        if name in self._replaced_names:
            raise model_replaced(name, current.names)
        raise model_not_found(name, current.names)

    def engines(self) -> list[Engine]:
        with self._lock:
            return [self._current.engine, *(m.engine for m in self._retiring)]

    def install(self, new: ServedModel) -> None:
        with self._lock:
            old, self._current = self._current, new
            self._retiring.append(old)
            self._replaced_names.update(old.names)
            self._replaced_names.difference_update(new.names)
        log.info("now serving %s (was %s); the old engine finishes its requests", new.checkpoint_name,
                 old.checkpoint_name)
        old.engine.close()
        threading.Thread(target=self._forget_when_drained, args=(old,), daemon=True).start()

    def _forget_when_drained(self, old: ServedModel) -> None:
        old.engine.drained.wait()
        with self._lock:
            self._retiring.remove(old)
        old.engine.decoder = None  # the weights and cache can go now
        log.info("released %s", old.checkpoint_name)

    def shutdown(self) -> None:
        for engine in self.engines():
            engine.stop()


class ManifestWatcher:
    """Polls the manifest and installs each new deployment it names.

    A manifest that cannot be read, or a deployment that fails to load for any reason, is logged
    and the current model stays; the same file is not retried until it changes again.
    """

    def __init__(self, path: Path, registry: ModelRegistry, settings: ServerSettings,
                 metrics: EngineMetrics | None = None, on_swap: Callable[[], None] | None = None):
        self.path = path
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.on_swap = on_swap
        self._seen: tuple | None = None  # first poll compares the manifest with what is loaded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="manifest-watcher", daemon=True)

    def start(self) -> ManifestWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _signature(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            signature = self._signature()
            if signature is None or signature == self._seen:
                continue
            self._seen = signature
            try:
                self.check_now()
            except Exception:
                log.exception("could not follow the deployment manifest %s", self.path)

    def check_now(self) -> bool:
        """Install the manifest's deployment if it differs from the current one; True if it did."""
        try:
            manifest = read_manifest(self.path)
        except ManifestError as e:
            log.error("ignoring manifest change: %s", e)
            return False
        current = self.registry.current
        if (manifest.deployment_id == current.deployment_id
                and str(Path(manifest.checkpoint_path).resolve()) == current.checkpoint_path):
            return False
        log.info("deployment %s names %s; loading it beside %s", manifest.deployment_id,
                 manifest.checkpoint_name, current.checkpoint_name)
        try:
            new = load_served_model(manifest.checkpoint_path, self.settings, metrics=self.metrics,
                                    manifest=manifest, timed_before=current.timed_layouts)
        except (CheckpointError, OSError) as e:
            log.error("keeping %s: deployment %s failed to load: %s", current.checkpoint_name,
                      manifest.deployment_id, e)
            return False
        except Exception:
            # Whatever else went wrong, the model in service is still sound: keep answering with it.
            log.exception("keeping %s: deployment %s failed to load", current.checkpoint_name,
                          manifest.deployment_id)
            return False
        self.registry.install(new)
        if self.on_swap is not None:
            self.on_swap()
        return True


def initial_model(settings: ServerSettings, metrics: EngineMetrics | None = None) -> ServedModel:
    if settings.manifest is not None:
        manifest = read_manifest(settings.manifest)
        return load_served_model(manifest.checkpoint_path, settings, metrics=metrics, manifest=manifest)
    return load_served_model(settings.checkpoint, settings, metrics=metrics)
