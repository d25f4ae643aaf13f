"""The shared body of the `train` and `finetune` commands: run, report, and fail in one line.

Errors in the user's inputs end a standalone run with one line; under torchrun they
propagate so that `torch.distributed.elastic.multiprocessing.errors.record` hands the
exception text to the launcher (and through it to Dagster). Under Dagster Pipes, rank 0
reports the final checkpoint (see pipes_bridge).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanogpt_core.pipes_bridge import (PipesObserver, checkpoint_weights_version, pipes_session, report_checkpoint,
                                       result_metadata)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def run_training_entrypoint(run: Callable[[Any | None], Any], user_errors: tuple[type[BaseException], ...],
                            stage: str) -> None:
    """`run(observer)` trains and returns a TrainResult; this prints where its files are.

    Under Pipes, rank 0 reports the final checkpoint with the hash of its weights as the
    data version.
    """
    with pipes_session() as pipes:
        try:
            result = run(PipesObserver(pipes) if pipes is not None else None)
        except user_errors as e:
            if under_torchrun() or pipes is not None:
                raise
            sys.exit(f"error: {e}")
        if int(os.environ.get("RANK", "0")) != 0:
            return
        print(f"checkpoints: {result.out_dir}")
        print(f"final checkpoint: {result.final_checkpoint}")
        print(f"metrics: {result.metrics_path}")
        if result.final_val_loss is not None:
            print(f"val loss: {result.initial_val_loss} -> {result.final_val_loss}")
        if pipes is not None:
            report_checkpoint(pipes, checkpoint=Path(result.final_checkpoint),
                              data_version=checkpoint_weights_version(result.final_checkpoint),
                              metadata=result_metadata(result, stage))
