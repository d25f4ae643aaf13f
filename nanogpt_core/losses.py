"""Cross-entropy of the output layer, for training, without materialising the logits.

At GPT-2's vocabulary the logits are the largest tensor of a training step: 412 MB in fp32
for 2048 tokens, and the softmax, the log and their gradients each stream it through memory
again. `linear_cross_entropy` walks the rows in chunks instead. For each chunk it computes
the logits, the loss, and the gradient with respect to those logits, and folds that
gradient straight into the gradients of the input and the weight; the backward pass only
scales what the forward pass accumulated.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1

# Rows of logits computed at a time. A (128, 50304) fp32 chunk is 26 MB: it stays inside a
# 32 MB L3 and under glibc's 32 MB mmap threshold, so each chunk reuses warm memory instead
# of faulting in fresh pages. On a 2-core EPYC, 64 and 256 rows were both slower.
CHUNK_ROWS = 128


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
    # Logits are laid out (vocab, rows): `weight @ x.T` runs faster on MKL than `x @ weight.T`
    # for these thin shapes, and the softmax then reduces over the outer dimension.
    logits_buf = x.new_empty(weight.size(0) * min(chunk_rows, n_valid))
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, n_valid, chunk_rows):
            end = min(start + chunk_rows, n_valid)
            x_chunk, t_chunk = x[start:end], targets[None, start:end]
            logits = logits_buf[:weight.size(0) * (end - start)].view(weight.size(0), end - start)
            logits = torch.mm(weight, x_chunk.T, out=logits).float()
            target_logit = logits.gather(0, t_chunk)
            # softmax and log-sum-exp in place, in one buffer, max-shifted for stability
            col_max = logits.amax(0, keepdim=True)
            probs = logits.sub_(col_max).exp_()
            col_sum = probs.sum(0, keepdim=True)
            row_loss[start:end] = (col_max + col_sum.log() - target_logit).squeeze(0)
            if not with_grads:
                continue
            # d(loss)/d(logits) = softmax - one_hot(target)
            grad_logits = probs.div_(col_sum)
            grad_logits.scatter_add_(0, t_chunk, grad_logits.new_full(t_chunk.shape, -1.0))
            grad_logits = grad_logits.to(x.dtype)
            torch.mm(grad_logits.T, weight, out=grad_x[start:end])
            if grad_weight.dtype == x.dtype:
                grad_weight.addmm_(grad_logits, x_chunk)
            else:  # reduced-precision matmul, fp32 accumulation
                grad_weight += grad_logits @ x_chunk

    if with_grads:
        if n_valid < n_rows:
            grad_x = grad_x.new_zeros(n_rows, shape[-1]).index_copy_(0, valid_rows, grad_x)
        grad_x = grad_x.view(shape)
    return row_loss.sum(), n_valid, grad_x, grad_weight
