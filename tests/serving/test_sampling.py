"""Sampling knobs, without a server."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from serving.sampling import SamplingParams, generator_for, sample_token


def test_greedy_top_k_one_and_logit_bias():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0), generator_for(0, 0), Counter()).token == 1
    top1 = SamplingParams(max_tokens=1, temperature=1.0, top_k=1)
    assert {sample_token(logits, top1, generator_for(s, 0), Counter()).token for s in range(20)} == {1}
    biased = SamplingParams(max_tokens=1, temperature=0, logit_bias=((0, 100.0),))
    assert sample_token(logits, biased, generator_for(0, 0), Counter()).token == 0


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    params = SamplingParams(max_tokens=1, top_p=0.8)
    drawn = {sample_token(logits, params, generator_for(s, 0), Counter()).token for s in range(200)}
    assert drawn == {0, 1}


def test_penalties_lower_tokens_already_generated():
    logits = torch.tensor([2.0, 1.9])
    params = SamplingParams(max_tokens=1, temperature=0, frequency_penalty=0.5)
    assert sample_token(logits, params, generator_for(0, 0), Counter({0: 1})).token == 1
    params = SamplingParams(max_tokens=1, temperature=0, presence_penalty=0.2)
    assert sample_token(logits, params, generator_for(0, 0), Counter({0: 3})).token == 1


def test_logprobs_are_of_the_unscaled_distribution():
    logits = torch.tensor([1.0, 2.0, 3.0])
    params = SamplingParams(max_tokens=1, temperature=0.5, logprobs=True, top_logprobs=2)
    sampled = sample_token(logits, params, generator_for(1, 0), Counter())
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
    sampled = sample_token(logits, params, generator_for(0, 0), Counter())
    assert sampled.token == 1
    assert sampled.logprob == pytest.approx(float(torch.log_softmax(logits, dim=-1)[1]))


@pytest.mark.parametrize("top_p", [1.0, 0.5, 1e-300])
def test_small_temperatures_on_large_logits_still_sample_a_valid_token(top_p):
    # 1e4 / 1e-5 = 1e9: fine in float32 once the largest logit is shifted to 0, where the
    # unshifted values would give inf - inf = NaN in softmax.
    logits = torch.tensor([1e4, 1e4 - 1e-3, -1e4, 0.0], dtype=torch.float16)
    params = SamplingParams(max_tokens=1, temperature=1e-5, top_p=top_p, top_k=3,
                            logit_bias=((2, 100.0),), frequency_penalty=2.0)
    drawn = {sample_token(logits, params, generator_for(s, 0), Counter({3: 5})).token for s in range(20)}
    assert drawn <= {0, 1}
