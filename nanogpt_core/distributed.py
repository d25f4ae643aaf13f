"""Process-group set-up for training under torchrun: gloo on CPU, NCCL on CUDA.

A collective waits at most the process-group timeout for its peers. When a peer dies or
hangs, the backend's error speaks of sockets and milliseconds; `lost_peer_error` turns it
into one that names the rank (and host) that went missing, so a multi-node failure can be
traced to its machine without reading every node's log.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
DEFAULT_PROCESS_GROUP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    # the address each rank reaches the rendezvous host from, in rank order; empty when alone
    rank_addresses: tuple[str, ...] = field(default=())
    timeout_s: float = DEFAULT_PROCESS_GROUP_TIMEOUT_S

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


def setup_distributed(device_preference: str = "auto",
                      timeout_s: float = DEFAULT_PROCESS_GROUP_TIMEOUT_S) -> DistContext:
    """Join the process group torchrun describes in the environment, or run as a single process.

    `timeout_s` bounds every collective: a peer that hangs or vanishes ends the run after it.
    """
    if timeout_s <= 0:
        raise ValueError(f"process_group_timeout_s must be positive, got {timeout_s}")
    launched_by_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device = pick_device(device_preference, local_rank)
    addresses: tuple[str, ...] = ()
    if launched_by_torchrun and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    if dist.is_available() and dist.is_initialized():
        # Gathered while every peer is still there, so a later failure can be put to a rank.
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, own_address())
        addresses = tuple(gathered)
    return DistContext(rank, local_rank, world_size, local_world_size, device, addresses, timeout_s)


def own_address() -> str:
    """The local address this process reaches the rendezvous host (MASTER_ADDR) from.

    That is the address its peers see its connections come from, hence the one a
    backend's "connection reset by [address]" names. No packet is sent: connecting a UDP
    socket only picks the route.
    """
    target = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, int(os.environ.get("MASTER_PORT", 29500))))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


class PeerLostError(RuntimeError):
    """A collective failed because another rank died, hung or became unreachable."""


# gloo: "Read error [10.0.0.2]:41234: Connection reset by peer", "Connection closed by peer [::1]:5"
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f:.]+)\]:\d+")
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Read error", "Write error",
              "Connection refused", "No route to host")
# gloo: "Timed out waiting 20000ms for recv operation to complete"; NCCL's watchdog:
# "Watchdog caught collective operation timeout"
_TIMED_OUT = ("Timed out waiting", "collective operation timeout")


def lost_peer_error(error: BaseException, ctx: DistContext) -> PeerLostError | None:
    """A PeerLostError naming the lost rank(s) when `error` is a backend's lost-peer or timeout
    error; None for any other error.

    The backend names a vanished peer by its address only, mapped here back to ranks; a
    timeout names nobody, so the suspects are the other ranks (exactly one in a pair).
    """
    if not ctx.rank_addresses or not isinstance(error, RuntimeError):
        return None
    text = _error_chain_text(error)
    others = [r for r in range(ctx.world_size) if r != ctx.rank]
    if any(marker in text for marker in _PEER_GONE):
        found = _PEER_ADDRESS.search(text)
        address = found.group(1) if found else None
        ranks = [r for r in others if address is not None and ctx.rank_addresses[r] == address]
        where = f" at {address}" if address else ""
        if ranks:
            who = _ranks_phrase(ranks) + where
        else:
            who = "a peer" + where + f" (not an address any rank registered; the others are {_ranks_phrase(others)})"
        return PeerLostError(f"rank {ctx.rank} lost {who}: the connection dropped during a collective, so that "
                             f"process or its node died; see its log for why. Backend said: {_first_line(text)}")
    if any(marker in text for marker in _TIMED_OUT):
        who = _ranks_phrase(others) if len(others) == 1 else f"one of {_ranks_phrase(others)}"
        return PeerLostError(f"rank {ctx.rank} timed out after {ctx.timeout_s:g} s (process_group_timeout_s) "
                             f"waiting for {who}: that peer hung or its node became unreachable. "
                             f"Backend said: {_first_line(text)}")
    return None


@contextlib.contextmanager
def peer_failures_named(ctx: DistContext) -> Iterator[None]:
    """Re-raise a backend's lost-peer or timeout error as a PeerLostError naming the rank."""
    try:
        yield
    except Exception as e:
        named = lost_peer_error(e, ctx)
        if named is None:
            raise
        raise named from e


def _error_chain_text(error: BaseException) -> str:
    parts, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _ranks_phrase(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


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
