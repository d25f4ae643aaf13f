"""Sampling knobs, without a server."""

from __future__ import annotations

import pytest
import torch

from serving.sampling import LogitBias, SamplingParams, TokenCounts, draw, generator_for, sample_token


def counts_of(params: SamplingParams, *tokens: int) -> TokenCounts:
    counts = params.token_counts()
    for token in tokens:
        counts.add(token)
    return counts


def test_greedy_top_k_one_and_logit_bias():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0), generator_for(0, 0), TokenCounts()).token == 1
    top1 = SamplingParams(max_tokens=1, temperature=1.0, top_k=1)
    assert {sample_token(logits, top1, generator_for(s, 0), TokenCounts()).token for s in range(20)} == {1}
    biased = SamplingParams(max_tokens=1, temperature=0, logit_bias=((0, 100.0),))
    assert sample_token(logits, biased, generator_for(0, 0), TokenCounts()).token == 0


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    params = SamplingParams(max_tokens=1, top_p=0.8)
    drawn = {sample_token(logits, params, generator_for(s, 0), TokenCounts()).token for s in range(200)}
    assert drawn == {0, 1}


def test_penalties_lower_tokens_already_generated():
    logits = torch.tensor([2.0, 1.9])
    params = SamplingParams(max_tokens=1, temperature=0, frequency_penalty=0.5)
    assert sample_token(logits, params, generator_for(0, 0), counts_of(params, 0)).token == 1
    params = SamplingParams(max_tokens=1, temperature=0, presence_penalty=0.2)
    assert sample_token(logits, params, generator_for(0, 0), counts_of(params, 0, 0, 0)).token == 1


def test_logprobs_are_of_the_unscaled_distribution():
    logits = torch.tensor([1.0, 2.0, 3.0])
    params = SamplingParams(max_tokens=1, temperature=0.5, logprobs=True, top_logprobs=2)
    sampled = sample_token(logits, params, generator_for(1, 0), TokenCounts())
    expected = torch.log_softmax(logits, dim=-1)
    assert sampled.logprob == pytest.approx(float(expected[sampled.token]))
    assert [t for t, _ in sampled.top] == [2, 1]


def test_seeded_generators_repeat_and_choices_differ():
    a = torch.rand(4, generator=generator_for(5, 0))
    assert torch.equal(a, torch.rand(4, generator=generator_for(5, 0)))
    assert not torch.equal(a, torch.rand(4, generator=generator_for(5, 1)))


@pytest.mark.parametrize("temperature", [1e-39, 5e-324, 1e-6])
def test_a_temperature_near_zero_is_greedy(temperature):
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    params = SamplingParams(max_tokens=1, temperature=temperature, logprobs=True)
    sampled = sample_token(logits, params, generator_for(0, 0), TokenCounts())
    assert sampled.token == 1
    assert sampled.logprob == pytest.approx(float(torch.log_softmax(logits, dim=-1)[1]))


@pytest.mark.parametrize("top_p", [1.0, 0.5, 1e-300])
def test_small_temperatures_on_large_logits_still_sample_a_valid_token(top_p):
    # 1e4 / 1e-5 = 1e9: fine in float32 once the largest logit is shifted to 0, where the
    # unshifted values would give inf - inf = NaN in softmax.
    logits = torch.tensor([1e4, 1e4 - 1e-3, -1e4, 0.0], dtype=torch.float16)
    params = SamplingParams(max_tokens=1, temperature=1e-5, top_p=top_p, top_k=3,
                            logit_bias=((2, 100.0),), frequency_penalty=2.0)
    drawn = {sample_token(logits, params, generator_for(s, 0), counts_of(params, *[3] * 5)).token for s in range(20)}
    assert drawn <= {0, 1}


def biased_and_penalised_one_entry_at_a_time(logits: torch.Tensor, biases: list[tuple[int, float]],
                                             generated: list[int], presence: float, frequency: float):
    """The plain reading of OpenAI's rules, token by token, to hold the vectorised version to."""
    out = logits.float().clone()
    for token in set(generated):
        out[token] -= generated.count(token) * frequency + presence
    for token, bias in biases:
        out[token] += bias
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_vectorised_bias_and_penalties_match_the_entry_by_entry_computation(temperature):
    vocab = 50257
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 3
    biases = [((i * 7919) % vocab, ((i % 21) - 10) * 0.37) for i in range(300)] + [(11, 2.0), (11, -0.5)]
    generated = [5, 5, 5, 900, 11, 50256, 900]
    params = SamplingParams(max_tokens=1, temperature=temperature, presence_penalty=0.6, frequency_penalty=-0.3,
                            logit_bias=LogitBias.of(biases), logprobs=True, top_logprobs=5)
    sampled = sample_token(logits, params, generator_for(3, 0), counts_of(params, *generated))

    expected_logits = biased_and_penalised_one_entry_at_a_time(logits, biases, generated, 0.6, -0.3)
    expected_logprobs = torch.log_softmax(expected_logits, dim=-1)
    if temperature == 0.0:
        assert sampled.token == int(torch.argmax(expected_logits))
    else:
        scaled = (expected_logits - expected_logits.max()) / temperature
        expected = draw(torch.softmax(scaled, dim=-1), generator_for(3, 0))
        assert sampled.token == expected
    assert sampled.logprob == pytest.approx(float(expected_logprobs[sampled.token]), abs=1e-5)
    values, ids = torch.topk(expected_logprobs, 5)
    assert [t for t, _ in sampled.top] == ids.tolist()
    assert [lp for _, lp in sampled.top] == pytest.approx(values.tolist(), abs=1e-5)


def test_counts_are_kept_only_when_a_penalty_needs_them():
    assert not SamplingParams(max_tokens=1).token_counts().tracked
    counts = SamplingParams(max_tokens=1, presence_penalty=0.1).token_counts()
    assert counts.tracked and not counts
    counts.add(7)
    assert counts and counts.total == 1


def test_logit_bias_pairs_given_by_hand_become_tensors():
    params = SamplingParams(max_tokens=1, logit_bias=((3, 1.5), (4, -2.0)))
    assert isinstance(params.logit_bias, LogitBias) and len(params.logit_bias) == 2
    assert SamplingParams(max_tokens=1, logit_bias=()).logit_bias is None


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.3, 0.0])
    generator = torch.Generator().manual_seed(3)
    counts = torch.bincount(torch.tensor([draw(probs, generator) for _ in range(20_000)]), minlength=6)
    assert counts[1] == counts[3] == counts[5] == 0
    # Within about five standard deviations of 20,000 draws.
    assert torch.allclose(counts.float() / 20_000, probs, atol=0.02)
    first, second = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [draw(probs, first) for _ in range(50)] == [draw(probs, second) for _ in range(50)]
