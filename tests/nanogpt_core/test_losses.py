"""The chunked linear cross-entropy against the plain `F.cross_entropy` over full logits."""

import pytest
import torch
from torch.nn import functional as F

from nanogpt_core.losses import linear_cross_entropy

VOCAB, EMBD = 1000, 32


def make_inputs(batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, EMBD, generator=g)
    weight = torch.randn(VOCAB, EMBD, generator=g) * 0.5
    targets = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return x, weight, targets


def loss_and_grads(loss_fn, x, weight, targets, grad_scale: float = 1.0):
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = loss_fn(x, weight, targets)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad, weight.grad


def reference(x, weight, targets):
    logits = F.linear(x, weight)
    return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1), ignore_index=-1)


def assert_matches_reference(x, weight, targets, chunk_rows: int, grad_scale: float = 1.0):
    expected = loss_and_grads(reference, x, weight, targets, grad_scale)
    got = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), x, weight, targets, grad_scale)
    for name, e, g in zip(("loss", "grad x", "grad weight"), expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 150, 10_000])
def test_matches_full_logits_cross_entropy(chunk_rows):
    # 3 * 50 = 150 rows: 7 and 64 leave a ragged last chunk, 10_000 means a single chunk
    x, weight, targets = make_inputs(3, 50)
    assert_matches_reference(x, weight, targets, chunk_rows)


def test_ignored_targets_including_a_fully_masked_chunk():
    x, weight, targets = make_inputs(2, 60, seed=1)
    targets[0, :45] = -1  # a run of masked rows longer than two 16-row chunks
    targets[1, ::3] = -1  # scattered ignored rows in the rest
    assert_matches_reference(x, weight, targets, chunk_rows=16)
    x_grad = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=16), x, weight, targets)[1]
    assert torch.all(x_grad[targets == -1] == 0)


def test_non_contiguous_targets():
    x, weight, _ = make_inputs(2, 40, seed=6)
    tokens = torch.randint(0, VOCAB, (2, 41), generator=torch.Generator().manual_seed(6))
    assert_matches_reference(x, weight, tokens[:, 1:], chunk_rows=32)


def test_backward_scales_with_the_incoming_gradient():
    # The trainer divides the loss by its gradient-accumulation steps before backward.
    x, weight, targets = make_inputs(2, 40, seed=2)
    assert_matches_reference(x, weight, targets, chunk_rows=32, grad_scale=0.25)


def test_all_targets_ignored_gives_nan_loss_and_zero_grads():
    x, weight, targets = make_inputs(2, 10)
    targets.fill_(-1)
    loss, x_grad, weight_grad = loss_and_grads(linear_cross_entropy, x, weight, targets)
    assert torch.isnan(loss)  # as F.cross_entropy: a mean over no elements
    assert torch.all(x_grad == 0) and torch.all(weight_grad == 0)


def test_without_grad_returns_the_same_loss():
    x, weight, targets = make_inputs(2, 50, seed=3)
    targets[0, :20] = -1
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, chunk_rows=24)
        expected = reference(x, weight, targets)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_gradients_are_bit_identical_across_runs():
    x, weight, targets = make_inputs(4, 64, seed=4)
    targets[1, 10:30] = -1
    first = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=48), x, weight, targets)
    second = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=48), x, weight, targets)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autocast_runs_matmuls_in_reduced_precision_and_returns_fp32():
    x, weight, targets = make_inputs(2, 30, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, x_grad, weight_grad = loss_and_grads(linear_cross_entropy, x, weight, targets)
    assert loss.dtype == x_grad.dtype == weight_grad.dtype == torch.float32
    expected = loss_and_grads(reference, x, weight, targets)
    torch.testing.assert_close(loss, expected[0], rtol=2e-2, atol=0)  # bf16 logits, fp32 softmax
