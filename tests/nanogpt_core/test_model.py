"""The GPT-2 model: its size, its initialisation, its cached inference path and packed rows."""

import math

import pytest
import torch

from nanogpt_core.config import get_profile
from nanogpt_core.model import GPT, GPTConfig, KVCache

TINY = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)


def test_gpt2_124m_has_openai_gpt2_small_parameter_count():
    # OpenAI's GPT-2 small: 124,439,808 parameters with its 50257-token vocabulary.
    cfg = get_profile("gpt2-124m").model_config()
    assert GPT(GPTConfig(**{**cfg.__dict__, "vocab_size": 50257})).num_params() == 124_439_808
    # Padding the vocabulary to 50304 adds 47 embedding rows of 768.
    assert GPT(cfg).num_params() == 124_439_808 + 47 * 768


def test_parameter_names_follow_gpt2():
    names = set(GPT(TINY).state_dict())
    for expected in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                     "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                     "transformer.ln_f.bias", "lm_head.weight"):
        assert expected in names


def test_input_and_output_embeddings_are_tied():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_start_smaller_by_sqrt_of_twice_the_depth():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    residual = model.transformer.h[0].mlp.c_proj.weight.std().item()
    plain = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert plain == pytest.approx(0.02, rel=0.05)
    assert residual == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)


def test_forward_returns_logits_for_every_position_and_loss_only_with_targets():
    model = GPT(TINY)
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 50304) and loss is None
    logits, loss = model(idx, idx)
    assert loss is not None and loss.item() == pytest.approx(math.log(50304), rel=0.05)


def test_training_path_loss_matches_the_full_logits_loss_and_honours_ignored_targets():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 50257, (2, 16))
    targets = idx.clone()
    targets[0, :5] = -1
    _, full = model(idx, targets)
    _, fused = model(idx, targets, return_logits=False)
    assert fused.item() == pytest.approx(full.item(), rel=1e-5)


def test_decoding_with_the_kv_cache_gives_the_same_logits_as_a_full_forward_pass():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 50257, (3, 24))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(TINY, batch_size=3)
        pieces = [model(idx[:, :10], kv_cache=cache)[0], model(idx[:, 10:13], kv_cache=cache)[0]]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(13, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_greedy_generation_with_the_cache_equals_recomputing_the_whole_context():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompt = torch.randint(0, 50257, (1, 5))
    generated = model.generate(prompt, max_new_tokens=10, temperature=0)
    idx = prompt
    with torch.no_grad():
        for _ in range(10):
            logits, _ = model(idx)
            idx = torch.cat([idx, logits[:, -1, :50257].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, idx)


def test_two_sequences_packed_into_one_row_see_only_themselves_given_positions_and_a_mask():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    first, second = torch.randint(0, 50257, (1, 7)), torch.randint(0, 50257, (1, 5))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    segment = torch.tensor([0] * 7 + [1] * 5)
    mask = (segment[:, None] == segment[None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    with torch.no_grad():
        together, _ = model(packed, positions=positions, attn_mask=mask.view(1, 1, 12, 12))
        alone = torch.cat([model(first)[0], model(second)[0]], dim=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_the_plain_causal_path_asks_attention_for_its_causal_kernel(monkeypatch):
    import nanogpt_core.model as model_module

    calls = []
    sdpa = model_module.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", recording)
    GPT(TINY)(torch.randint(0, 50257, (2, 16)))
    assert calls == [(None, True)] * TINY.n_layer


@pytest.mark.parametrize("kwargs, problem", [
    ({"positions": torch.arange(8).view(1, 8)}, "given together"),
    ({"positions": torch.arange(4).view(1, 4), "attn_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool)},
     "shape of idx"),
    ({"positions": torch.full((1, 8), 32), "attn_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)},
     "position 32 exceeds block_size 32"),
    ({"positions": torch.arange(8).view(1, 8), "attn_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool),
      "kv_cache": KVCache(TINY, batch_size=1)}, "do not combine with a kv_cache"),
])
def test_explicit_positions_and_masks_that_cannot_work_are_refused(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        GPT(TINY)(torch.zeros(1, 8, dtype=torch.long), **kwargs)


def test_sequences_longer_than_the_block_size_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        GPT(TINY)(torch.zeros(1, 33, dtype=torch.long))


def test_optimizer_decays_matrices_and_embeddings_but_not_biases_or_norms():
    model = GPT(TINY)
    optimizer = model.configure_optimizer(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_params()
