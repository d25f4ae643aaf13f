"""A backend's lost-peer and timeout errors become errors that name the missing rank."""

from __future__ import annotations

import pytest
import torch

from nanogpt_core.config import get_profile
from nanogpt_core.distributed import DistContext, PeerLostError, lost_peer_error, peer_failures_named, setup_distributed
from nanogpt_core.config import get_finetune_profile

GLOO_RESET = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.200.0.2]:41234: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 7000ms for recv"


def context(rank: int, addresses: tuple[str, ...], timeout_s: float = 7.0) -> DistContext:
    return DistContext(rank=rank, local_rank=0, world_size=len(addresses), local_world_size=1,
                       device=torch.device("cpu"), rank_addresses=addresses, timeout_s=timeout_s)


def test_a_reset_connection_names_every_rank_on_the_peer_host():
    ctx = context(0, ("10.200.0.1", "10.200.0.2", "10.200.0.2", "10.200.0.3"))
    error = lost_peer_error(RuntimeError(GLOO_RESET), ctx)
    assert isinstance(error, PeerLostError)
    assert "rank 0 lost ranks 1, 2 at 10.200.0.2" in str(error)
    assert "Connection reset by peer" in str(error)


def test_an_address_no_rank_registered_is_still_reported_with_the_suspects():
    error = lost_peer_error(RuntimeError(GLOO_RESET), context(1, ("10.0.0.1", "10.0.0.9")))
    assert "a peer at 10.200.0.2" in str(error) and "the others are rank 0" in str(error)


def test_a_timeout_in_a_pair_names_the_other_rank_and_the_configured_timeout():
    error = lost_peer_error(RuntimeError(GLOO_TIMEOUT), context(1, ("10.0.0.1", "10.0.0.2"), timeout_s=7))
    assert "rank 1 timed out after 7 s (process_group_timeout_s) waiting for rank 0" in str(error)


def test_a_timeout_among_many_lists_the_suspects():
    error = lost_peer_error(RuntimeError(GLOO_TIMEOUT), context(2, ("a", "b", "c")))
    assert "waiting for one of ranks 0, 1" in str(error)


def test_the_backend_error_is_found_behind_a_wrapping_exception():
    try:
        try:
            raise RuntimeError(GLOO_TIMEOUT)
        except RuntimeError as inner:
            raise RuntimeError("DDP reducer failed") from inner
    except RuntimeError as outer:
        assert lost_peer_error(outer, context(0, ("a", "b"))) is not None


def test_other_errors_pass_through_unchanged():
    ctx = context(0, ("a", "b"))
    assert lost_peer_error(ValueError("process_group_timeout_s must be positive"), ctx) is None
    assert lost_peer_error(RuntimeError("shape mismatch"), ctx) is None
    assert lost_peer_error(RuntimeError(GLOO_TIMEOUT), context(0, ())) is None  # not distributed
    with pytest.raises(KeyError):
        with peer_failures_named(ctx):
            raise KeyError("x")
    with pytest.raises(PeerLostError) as caught:
        with peer_failures_named(ctx):
            raise RuntimeError(GLOO_TIMEOUT)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_the_timeout_defaults_to_ten_minutes_and_must_be_positive():
    assert get_profile("micro").process_group_timeout_s == 600
    assert get_finetune_profile("micro").process_group_timeout_s == 600
    with pytest.raises(ValueError, match="process_group_timeout_s"):
        get_profile("micro", process_group_timeout_s=0)
    with pytest.raises(ValueError, match="process_group_timeout_s"):
        get_finetune_profile("micro", process_group_timeout_s=-1)
    with pytest.raises(ValueError, match="process_group_timeout_s"):
        setup_distributed("cpu", timeout_s=0)
