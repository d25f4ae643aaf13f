"""Cross-entropy of the output layer, for training."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` against `targets`, ignoring targets equal to -1."""
    logits = F.linear(x, weight)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
