"""Choosing the next token from one row of logits, with OpenAI's knobs.

Each sequence has its own `torch.Generator`, so a request with a `seed` draws the same
numbers whatever else shares its batch. Logprobs are those of the model's distribution
after penalties and logit bias, before temperature and truncation, as OpenAI reports them.

A temperature below `GREEDY_BELOW_TEMPERATURE` is taken as greedy, as vLLM does: dividing
by a temperature near zero sends the logits to infinity, and softmax of infinities is NaN.
Above it, the logits are shifted so that the largest is 0 before they are divided, so that
every scaled value is finite or -inf and at least one is exactly 0: the distribution is
always well defined.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), best first


def generator_for(seed: int, index: int) -> torch.Generator:
    """The generator of choice `index` of a request seeded with `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (2**63)
    return torch.Generator().manual_seed(mixed)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 counts: Counter[int]) -> SampledToken:
    """One token from a row of logits (vocab,), given how often each token was generated so far."""
    logits = logits.float()
    penalise = bool(counts) and bool(params.presence_penalty or params.frequency_penalty)
    if penalise or params.logit_bias:
        logits = logits.clone()
    if penalise:
        ids = torch.tensor(list(counts.keys()), dtype=torch.long)
        seen = torch.tensor(list(counts.values()), dtype=logits.dtype)
        logits[ids] -= seen * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        for token, bias in params.logit_bias:
            logits[token] += bias

    if params.temperature < GREEDY_BELOW_TEMPERATURE:
        token = int(torch.argmax(logits))
    else:
        scaled = (logits - logits.max()) / params.temperature
        if params.top_k and params.top_k < scaled.numel():
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token once the ones before it already hold top_p of the mass. The best
            # token always stays, also for a top_p that rounds to 0 in float32.
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
            drop[0] = False
            scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))

    if not params.logprobs:
        return SampledToken(token)
    log_probs = F.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if params.top_logprobs:
        values, ids = torch.topk(log_probs, params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return SampledToken(token, float(log_probs[token]), top)
