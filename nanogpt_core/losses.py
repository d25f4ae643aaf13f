"""Cross-entropy of the output layer, for training, without materialising the logits.

At GPT-2's vocabulary the logits are the largest tensors of a training step: 412 MB in fp32
for 2048 tokens, and the loss and its backward pass allocate several of them and stream
each through memory. On a CPU the allocations alone are costly, since memory that large is
handed back to the kernel when freed and paged in afresh on the next step.
`linear_cross_entropy` walks the rows in chunks instead. For each chunk it computes the
logits, the loss, and the gradient with respect to those logits, and folds that gradient
straight into the gradients of the input and the weight; the backward pass only scales
what the forward pass accumulated.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1

# Rows of logits computed at a time. On a 2-core EPYC 512 rows made the fastest training step:
# at 256 the `x @ weight.T` matmul runs on too thin a shape (the step was ~6% slower), and
# 1024 gained nothing. A 512-row fp32 chunk over a 50304-token vocabulary is 103 MB.
CHUNK_ROWS = 512


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` against `targets`, ignoring targets equal to -1.

    The value and the gradients equal those of
    `F.cross_entropy(F.linear(x, weight), targets, ignore_index=-1)` up to float rounding,
    and are deterministic: the chunks are always visited in the same order.
    """
    if torch.is_autocast_enabled(x.device.type):
        # The chunk loop runs with autocast off, so give its matmuls the dtype autocast
        # would have given F.linear; the softmax itself is always computed in fp32.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    loss_sum, n_valid, _, _ = _chunked_cross_entropy(x, weight, targets, chunk_rows, with_grads=False)
    return loss_sum / n_valid


class _LinearCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        loss_sum, n_valid, grad_x, grad_weight = _chunked_cross_entropy(
            x, weight, targets, chunk_rows, with_grads=True)
        ctx.save_for_backward(grad_x, grad_weight)
        ctx.n_valid = n_valid
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        # With every target ignored the loss is nan (0/0, as in F.cross_entropy) but the
        # gradients are zero, not nan.
        scale = grad_loss / max(ctx.n_valid, 1)
        return grad_x * scale.to(grad_x.dtype), grad_weight * scale, None, None


def _chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_rows: int, with_grads: bool):
    """Summed loss over the valid rows, their count, and (optionally) the summed gradients."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    targets = targets.reshape(-1)
    n_rows = targets.numel()
    valid_rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    n_valid = valid_rows.numel()
    if n_valid < n_rows:  # ignored rows cost nothing: drop them up front
        x, targets = x[valid_rows], targets[valid_rows]

    row_loss = torch.empty(n_valid, device=x.device)
    grad_x = torch.empty_like(x) if with_grads else None
    grad_weight = torch.zeros(weight.shape, device=x.device) if with_grads else None  # fp32 sums
    logits_buf = x.new_empty(min(chunk_rows, n_valid), weight.size(0))
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, n_valid, chunk_rows):
            end = min(start + chunk_rows, n_valid)
            x_chunk, t_chunk = x[start:end], targets[start:end, None]
            logits = torch.mm(x_chunk, weight.T, out=logits_buf[:end - start])
            log_probs = logits.float()  # the same buffer when the matmul ran in fp32
            torch.log_softmax(log_probs, dim=1, out=log_probs)
            row_loss[start:end] = -log_probs.gather(1, t_chunk).squeeze(1)
            if not with_grads:
                continue
            # d(loss)/d(logits) = softmax - one_hot(target), still in the same buffer
            grad_logits = log_probs.exp_()
            grad_logits.scatter_add_(1, t_chunk, grad_logits.new_full(t_chunk.shape, -1.0))
            grad_logits = grad_logits.to(x.dtype)
            torch.mm(grad_logits, weight, out=grad_x[start:end])
            if grad_weight.dtype == x.dtype:
                grad_weight.addmm_(grad_logits.T, x_chunk)
            else:  # reduced-precision matmul, fp32 accumulation
                grad_weight += grad_logits.T @ x_chunk

    if with_grads:
        if n_valid < n_rows:
            grad_x = grad_x.new_zeros(n_rows, shape[-1]).index_copy_(0, valid_rows, grad_x)
        grad_x = grad_x.view(shape)
    return row_loss.sum(), n_valid, grad_x, grad_weight
