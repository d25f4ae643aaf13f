"""Process-group set-up for training under torchrun: gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def device_type(self) -> str:
        return self.device.type


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    if preference != "cpu" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the torchrun agent) dies.

    torchrun starts each worker in a session of its own, so when torchrun itself is killed
    outright its workers would otherwise live on as orphans, still training and still
    writing checkpoints into the folder a resumed run is about to use.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def setup_distributed(device_preference: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or run as a single process."""
    launched_by_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = pick_device(device_preference, local_rank)
    if launched_by_torchrun and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, local_rank, world_size, local_world_size, device)


def teardown_distributed(after_error: bool = False) -> None:
    """Leave the process group. After an error the peers may be gone, so no goodbye is waited for."""
    if dist.is_available() and dist.is_initialized():
        if after_error:
            return
        # Leave together: a gloo rank whose peer has already closed its connections aborts.
        dist.barrier()
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a tensor over all ranks (gloo has no AVG, so sum and divide)."""
    if ctx.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def gather_to_all(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
