"""How the decode slots and the queue are shared between callers.

A caller is an API key, or the client's address on a server without keys (the same identity
the per-caller limits use, `serving.rate_limits.caller_identity`). Two shares, each tied to
the engine size it divides:

- Decode slots: while another caller holds or wants a slot, no caller takes more than an equal
  part of `max_batch` among the callers that hold or want slots (half with two callers, a
  third with three, at least one). Alone, one caller may fill every slot; when someone else
  arrives and no slot is free, the slots held beyond the share are handed over (see
  `serving.engine`).
- The queue: a caller may have at most a quarter of `max_queue` completions waiting, so that
  three callers at their share still leave room for the others. The same number bounds a
  single request, since a request larger than its caller's share could never be queued.
"""

from __future__ import annotations


def caller_slot_share(max_batch: int, callers: int = 2) -> int:
    """Decode slots one caller may hold while another caller waits, with `callers` holding or wanting slots."""
    return max(1, max_batch // max(2, callers))


def caller_queue_share(max_queue: int) -> int:
    """Completions (prompts times `n`) one caller may have waiting; also the most one request may ask for."""
    return max(1, max_queue // 4)
