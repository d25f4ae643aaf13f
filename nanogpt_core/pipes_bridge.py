"""Report training progress to Dagster when the trainer was launched through Dagster Pipes.

The trainer stays usable on its own: nothing here happens unless the process was started
by a Pipes client (`DAGSTER_PIPES_CONTEXT` in the environment) and it is global rank 0.
torchrun hands the Pipes environment to every rank, and Pipes accepts one reporter only.
The protocol package `dagster_pipes` has no dependencies and is imported only in that case;
the training library never imports Dagster itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanogpt_core.checkpoint import read_checkpoint
from nanogpt_core.content_hash import tensors_version

PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"


def launched_through_pipes() -> bool:
    return PIPES_CONTEXT_ENV in os.environ and int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def pipes_session() -> Iterator[Any | None]:
    """The Pipes context on rank 0 of a Pipes-launched process; None everywhere else."""
    if not launched_through_pipes():
        yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


class PipesObserver:
    """Forwards each step's metrics and each checkpoint to the Dagster run log."""

    def __init__(self, pipes: Any, log_every: int = 1):
        self.pipes = pipes
        self.log_every = max(1, log_every)

    def on_step(self, metrics: dict[str, Any]) -> None:
        if metrics["step"] % self.log_every == 0 or "val_loss" in metrics:
            self.pipes.log.info("train step " + json.dumps(metrics))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.pipes.log.info(f"checkpoint written: {path} (step {step})")


def report_checkpoint(pipes: Any, *, checkpoint: Path, data_version: str, metadata: dict[str, Any]) -> None:
    """The materialization of a training asset: the final checkpoint and what made it."""
    pipes.report_asset_materialization(
        metadata={"checkpoint": {"raw_value": str(checkpoint), "type": "path"}, **metadata},
        data_version=data_version,
    )


def checkpoint_weights_version(path: str | Path) -> str:
    """A hash of a checkpoint's weights alone, in name order: identical training gives an identical version."""
    return tensors_version(dict(sorted(read_checkpoint(path)["model"].items())))


def result_metadata(result: Any, stage: str) -> dict[str, Any]:
    rates = []
    if Path(result.metrics_path).exists():
        for line in Path(result.metrics_path).read_text().splitlines():
            record = json.loads(line)
            if "tokens_per_sec" in record:
                rates.append(record["tokens_per_sec"])
    rates.sort()
    return {
        "stage": stage,
        "final_val_loss": result.final_val_loss,
        "initial_val_loss": result.initial_val_loss,
        "final_train_loss": result.final_train_loss,
        "tokens_seen": result.tokens_seen,
        "wall_seconds": round(result.wall_seconds, 2),
        "median_tokens_per_sec": rates[len(rates) // 2] if rates else None,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "lineage": {"raw_value": result.lineage, "type": "json"},
        "metrics_file": {"raw_value": str(result.metrics_path), "type": "path"},
    }
