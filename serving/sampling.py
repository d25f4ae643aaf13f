"""Choosing the next token from one row of logits, with OpenAI's knobs.

Each sequence has its own `torch.Generator`, so a request with a `seed` draws the same
numbers whatever else shares its batch. Logprobs are those of the model's distribution
after penalties and logit bias, before temperature and truncation, as OpenAI reports them.

Every sample of every request is sampled on the engine's one thread, so the work per step
must not grow with what a client chose: the logit bias is one `index_add_` of tensors built
when the request is admitted, and the penalties one subtraction of a dense vector kept up to
date a token at a time, whatever the number of biased tokens or of tokens generated so far.

A temperature below `GREEDY_BELOW_TEMPERATURE` is taken as greedy, as vLLM does: dividing
by a temperature near zero sends the logits to infinity, and softmax of infinities is NaN.
Above it, the logits are shifted so that the largest is 0 before they are divided, so that
every scaled value is finite or -inf and at least one is exactly 0: the distribution is
always well defined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from nanogpt_core.tokenizer import VOCAB_SIZE

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, eq=False)
class LogitBias:
    """A request's `logit_bias` as a tensor of token ids and one of the biases to add to them.

    Built once per request and shared by its prompts and samples; `apply` is one tensor
    operation. A token named twice (as "7" and "07") gets both biases, as it always did.
    """

    ids: torch.Tensor  # int64, (entries,)
    values: torch.Tensor  # float32, (entries,)

    @classmethod
    def of(cls, biases: Iterable[tuple[int, float]]) -> LogitBias:
        pairs = list(biases)
        return cls(torch.tensor([token for token, _ in pairs], dtype=torch.long),
                   torch.tensor([bias for _, bias in pairs], dtype=torch.float32))

    def __len__(self) -> int:
        return self.ids.numel()

    def apply(self, logits: torch.Tensor) -> None:
        """Add the biases to a row of logits (float32), in place."""
        logits.index_add_(0, self.ids, self.values)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: LogitBias | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # Code that builds parameters by hand (benchmarks, tests) may pass (token, bias) pairs.
        if self.logit_bias is not None and not isinstance(self.logit_bias, LogitBias):
            object.__setattr__(self, "logit_bias", LogitBias.of(self.logit_bias) if self.logit_bias else None)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def token_counts(self) -> TokenCounts:
        """The counts one sample keeps of its own tokens: only what its penalties need."""
        return TokenCounts(self.presence_penalty, self.frequency_penalty) if self.penalised else TokenCounts()


class TokenCounts:
    """How often one sample has generated each token, kept as what the penalties take off each
    logit: a dense vector over the vocabulary, updated a token at a time.

    The penalties are then one subtraction per step, however many tokens came before. The
    vector (200 kB for GPT-2's vocabulary) exists only for a sample with a penalty, from its
    first token on.
    """

    def __init__(self, presence_penalty: float = 0.0, frequency_penalty: float = 0.0):
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.tracked = bool(presence_penalty or frequency_penalty)
        self.total = 0  # tokens added, tracked or not
        self._counts: dict[int, int] = {}  # at most one entry per token generated
        self._penalties: torch.Tensor | None = None

    def add(self, token: int) -> None:
        self.total += 1
        if not self.tracked:
            return
        if self._penalties is None or token >= self._penalties.numel():
            grown = torch.zeros(max(token + 1, VOCAB_SIZE))
            if self._penalties is not None:
                grown[:self._penalties.numel()] = self._penalties
            self._penalties = grown
        count = self._counts[token] = self._counts.get(token, 0) + 1
        self._penalties[token] = self.presence_penalty + count * self.frequency_penalty

    def __bool__(self) -> bool:
        return self._penalties is not None

    def penalise(self, logits: torch.Tensor) -> None:
        """Lower each generated token's logit (float32, in place) by presence + count * frequency."""
        if self._penalties is None:
            return
        size = min(logits.numel(), self._penalties.numel())
        logits[:size] -= self._penalties[:size]


@dataclass
class SampledToken:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), best first


def generator_for(seed: int, index: int) -> torch.Generator:
    """The generator of choice `index` of a request seeded with `seed`."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % (2**63)
    return torch.Generator().manual_seed(mixed)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token drawn from a distribution (vocab,): the first whose running sum of probabilities
    passes one uniform number from the sample's generator.

    `torch.multinomial` does the same job in 2-3 ms for GPT-2's vocabulary on one CPU thread, ten
    times this, and it runs once per sample per step on the engine's one thread. The sum is kept
    in float64 so that its rounding cannot shift mass between tokens; a token of probability 0
    has the same running sum as the one before it and so is never drawn.
    """
    cumulative = probs.cumsum(0, dtype=torch.float64)
    point = torch.rand(1, generator=generator, dtype=torch.float64) * cumulative[-1]
    return min(int(torch.searchsorted(cumulative, point, right=True)), probs.numel() - 1)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 counts: TokenCounts) -> SampledToken:
    """One token from a row of logits (vocab,), given how often each token was generated so far."""
    logits = logits.float()
    penalise = bool(counts)
    if penalise or params.logit_bias is not None:
        logits = logits.clone()
    if penalise:
        counts.penalise(logits)
    if params.logit_bias is not None:
        params.logit_bias.apply(logits)

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
        token = draw(torch.softmax(scaled, dim=-1), generator)

    if not params.logprobs:
        return SampledToken(token)
    log_probs = F.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if params.top_logprobs:
        values, ids = torch.topk(log_probs, params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return SampledToken(token, float(log_probs[token]), top)
