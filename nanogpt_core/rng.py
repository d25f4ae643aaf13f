"""Capture and restore every random number generator a training process uses.

The states are stored as tensors and plain values so a checkpoint holding them still
loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_cached)),
        "torch": torch.get_rng_state(),
        # Only this process's own GPU: asking for every device's state would open a CUDA context
        # on each GPU of the machine from every rank (hundreds of MB each, for nothing).
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        # Older checkpoints hold one state per visible device; newer ones only this rank's own.
        cuda_states = state["cuda"]
        own = cuda_states[torch.cuda.current_device()] if len(cuda_states) > 1 else cuda_states[0]
        torch.cuda.set_rng_state(own.cpu())
