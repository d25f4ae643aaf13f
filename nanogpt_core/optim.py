"""Optimizers beyond AdamW: Muon for the blocks' weight matrices, and a pair that steps as one.

Muon keeps a momentum of each matrix's gradient, as SGD does, but steps along that momentum's
nearest semi-orthogonal matrix (all singular values set to about one), found by five iterations
of a quintic Newton-Schulz polynomial. Every direction of the matrix then moves at the same rate,
not just the few that dominate the gradient, which is what makes it learn more per token than
AdamW early in training. It suits the 2-D weights inside the transformer blocks only; the
embeddings, the output layer, biases and norms stay with AdamW (see `GPT.configure_optimizer`).
References: K. Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024), and
J. Liu et al., "Muon is Scalable for LLM Training" (2025) for the learning-rate matching below.

Why not `torch.optim.Muon`: as of PyTorch 2.13 it always runs the iteration in bfloat16, which a
CPU without bf16 matrix units computes slowly: at the demo's shape a step of it took 756 ms on
2 cores against 26 ms for the same iteration in fp32 (the whole training step is about 800 ms).
This one runs the iteration in fp32 on the CPU and in bf16 on CUDA; otherwise it follows the
same update rule and defaults, with the same name for its state ("momentum_buffer").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

# The quintic's coefficients, chosen (Jordan, 2024) for the steepest slope at zero that still
# maps every singular value in (0, 1] into roughly [0.7, 1.2] after five iterations.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def orthogonalize(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """`matrix`'s singular values pushed to about one, its singular vectors kept (returned in fp32)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    dtype = torch.bfloat16 if matrix.is_cuda else torch.float32
    x = matrix.to(dtype)
    wide = x.size(0) <= x.size(1)
    if not wide:  # iterate on the side whose Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm, so every singular value <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).float()


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update is orthogonalised, for 2-D parameters only.

    `lr` is on AdamW's scale: each matrix's step is scaled by 0.2 * sqrt(max(rows, cols)), which
    gives the update the root-mean-square size an AdamW update has (Liu et al., 2025), so the two
    optimizers can share a schedule. Weight decay is decoupled, as in AdamW.
    """

    def __init__(self, params: Iterable[Any], lr: float, *, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon needs lr >= 0, weight_decay >= 0 and momentum in [0, 1); got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("Muon does not take a closure")
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                direction = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(direction)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class OptimizerPair:
    """Two optimizers over disjoint parameters that the training loop steps, schedules and saves
    as one. Each group may carry an `lr_scale`: the loop sets its rate to the schedule's times it."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        self.optimizers = (first, second)

    @property
    def kinds(self) -> list[str]:
        """The optimizers' class names, in order: what a saved state must have been saved by."""
        return [type(optimizer).__name__ for optimizer in self.optimizers]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"pair": [optimizer.state_dict() for optimizer in self.optimizers],
                "kinds": self.kinds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = self.kinds
        if state.get("kinds") != kinds:
            saved = state.get("kinds") or ["one optimizer (" + ", ".join(sorted(state)) + ")"]
            raise ValueError(f"the saved optimizer state is for {' + '.join(saved)}, not {' + '.join(kinds)}: "
                             f"resume with the optimizer the checkpoint was trained with")
        for optimizer, saved_state in zip(self.optimizers, state["pair"]):
            optimizer.load_state_dict(saved_state)
