"""Launch a training module under torchrun through Dagster Pipes, and explain its failures."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError

from pipeline.config import TorchrunConfig


def torchrun_command(config: TorchrunConfig, module: str, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run ... -m module args`, tied to the life of this process.

    `setpriv --pdeathsig INT` makes Linux interrupt torchrun when the Dagster step process
    dies, even by SIGKILL; without it torchrun is re-parented and trains on unseen.
    """
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={config.nproc_per_node}"]
    if config.nnodes > 1:
        if not config.rdzv_endpoint:
            raise dg.Failure(f"nnodes={config.nnodes} needs rdzv_endpoint (host:port every node can reach)")
        launcher += [f"--nnodes={config.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={config.rdzv_endpoint}"]
    else:
        launcher += ["--standalone"]
    command = [*launcher, "-m", module, *args]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "INT", *command] if setpriv else command


def run_through_pipes(context: dg.AssetExecutionContext, client: dg.PipesSubprocessClient,
                      command: list[str], env: dict[str, str] | None = None) -> dg.PipesClientCompletedInvocation:
    """Run the command; when a rank fails, raise its own exception text instead of an exit code.

    torchrun writes the first failing rank's error (as recorded by `errors.record` on the
    entry point) to TORCHELASTIC_ERROR_FILE.
    """
    with tempfile.TemporaryDirectory(prefix="torchrun-error-") as scratch:
        error_file = Path(scratch) / "error.json"
        context.log.info("launching: " + " ".join(command))
        try:
            return client.run(context=context, command=command,
                              env={**(env or {}), "TORCHELASTIC_ERROR_FILE": str(error_file),
                                   "PYTHONUNBUFFERED": "1"})
        except DagsterPipesExecutionError as e:
            message, traceback = read_rank_error(error_file)
            if message is None:
                raise
            raise dg.Failure(description=f"training failed: {message}",
                             metadata={"traceback": dg.MetadataValue.text(traceback or message)}) from e


def read_rank_error(error_file: Path) -> tuple[str | None, str | None]:
    """(message, traceback) from torchrun's error file; (None, None) when there is none."""
    try:
        payload = json.loads(error_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    detail = payload.get("message", payload)
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except json.JSONDecodeError:
            return detail.strip().splitlines()[-1], detail
    message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
    traceback = (detail.get("extraInfo", {}) or {}).get("py_callstack") if isinstance(detail, dict) else None
    last_line = (message or traceback or "").strip().splitlines()
    return (last_line[-1] if last_line else None), traceback
