"""Muon and the AdamW + Muon pair: what each parameter gets, the update rule, and exact resume."""

from __future__ import annotations

import io

import pytest
import torch

from nanogpt_core.model import GPT, GPTConfig
from nanogpt_core.optim import Muon, OptimizerPair, orthogonalize

SMALL = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


def test_orthogonalize_sets_every_singular_value_near_one_and_keeps_the_singular_vectors():
    torch.manual_seed(0)
    for shape in [(48, 16), (16, 48), (16, 16)]:
        matrix = torch.randn(shape)
        result = orthogonalize(matrix)
        assert result.shape == matrix.shape and result.dtype == torch.float32
        singular_values = torch.linalg.svdvals(result)
        # The quintic is tuned for speed, not convergence: values land in about [0.7, 1.2].
        assert singular_values.min() > 0.5 and singular_values.max() < 1.3, singular_values
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), result.flatten(), dim=0) > 0.95


def test_muon_refuses_parameters_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D parameters only.*\\(16,\\)"):
        Muon([torch.nn.Parameter(torch.zeros(16))], lr=0.01)


def test_muon_steps_along_the_orthogonalised_momentum_at_adamw_scale():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 8))
    before = weight.detach().clone()
    weight.grad = torch.randn(32, 8)
    Muon([weight], lr=0.01, weight_decay=0.1, nesterov=False, momentum=0.9).step()
    # First step: the momentum is (1 - momentum) * grad, whose orthogonalised form is the grad's.
    expected = before * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 32 ** 0.5 * orthogonalize(weight.grad)
    torch.testing.assert_close(weight.detach(), expected)


def test_with_a_muon_rate_the_blocks_matrices_go_to_muon_and_everything_else_to_adamw():
    model = GPT(SMALL)
    plain = model.configure_optimizer(0.1, 1e-3, "cpu")
    assert isinstance(plain, torch.optim.AdamW)

    pair = model.configure_optimizer(0.1, 1e-3, "cpu", muon_lr=0.02)
    adamw, muon = pair.optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    to_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    to_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert to_muon == {name for name, p in model.named_parameters() if p.dim() == 2 and ".h." in name}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= to_adamw
    assert not to_muon & to_adamw and len(to_muon | to_adamw) == len(list(model.parameters()))
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    assert muon.param_groups[0]["weight_decay"] == 0.1


def _train_steps(model: GPT, optimizer: OptimizerPair, batches: list[torch.Tensor]) -> list[float]:
    losses = []
    for step, batch in enumerate(batches):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (1 - step / 20) * group.get("lr_scale", 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_a_pair_restored_from_its_saved_state_continues_bit_for_bit():
    torch.manual_seed(0)
    batches = [torch.randint(0, SMALL.vocab_size, (4, 17)) for _ in range(8)]
    model = GPT(SMALL)
    optimizer = model.configure_optimizer(0.1, 1e-2, "cpu", muon_lr=0.02)
    _train_steps(model, optimizer, batches[:4])
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    reference = _train_steps(model, optimizer, batches[4:])

    saved.seek(0)
    payload = torch.load(saved, weights_only=True)  # as checkpoints are read
    restored = GPT(SMALL)
    restored.load_state_dict(payload["model"])
    restored_optimizer = restored.configure_optimizer(0.1, 1e-2, "cpu", muon_lr=0.02)
    restored_optimizer.load_state_dict(payload["optimizer"])
    assert _train_steps(restored, restored_optimizer, batches[4:]) == reference
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_a_pair_refuses_the_state_of_a_plain_adamw_run_with_a_clear_message():
    model = GPT(SMALL)
    adamw_state = model.configure_optimizer(0.1, 1e-3, "cpu").state_dict()
    pair = model.configure_optimizer(0.1, 1e-3, "cpu", muon_lr=0.02)
    with pytest.raises(ValueError, match="saved optimizer state is for one optimizer.*not AdamW \\+ Muon"):
        pair.load_state_dict(adamw_state)
