"""Scoring benchmark examples with a GPT, the way build-nanogpt scores HellaSwag.

The model reads encode(ctx) followed by encode(" " + ending), and an ending's score
is its cross-entropy summed over the ending's tokens only. Of the four endings, the pick is
the one with
  acc            the lowest summed loss,
  acc_norm       the lowest loss per ending token (build-nanogpt's normalisation),
  acc_char_norm  the lowest loss per character of the ending (lm-eval-harness's).
Losses are taken over GPT-2's 50,257 real tokens. The model's output layer has 50,304 rows
(padded for faster matmuls); admitting the padding rows to the softmax would shift every
loss, and with weights converted from OpenAI's GPT-2, whose logits sit far below zero, the
zero-logit padding rows would swamp them.

Why GPT-2 124M scores 0.2955 acc_norm here and 0.3114 in lm-eval-harness. Two things differ:
  - The normalisation. A token count depends on how the tokenizer happens to split an
    ending's words, and the per-token mean moves with it. The harness divides the
    log-likelihood by the length of the ending string instead, `len(choice)` without the
    joining space: characters, which equal bytes for all but about 0.5% of HellaSwag's
    endings. acc_char_norm applies that rule to the same losses.
  - The prompt. The harness does not score `ctx` as it stands: it builds
    "{activity_label}: {ctx_a} {ctx_b.capitalize()}", then removes WikiHow's bracketed
    markers ("[header]", "[step]", with " [title]" turned into ". ") and doubled spaces from
    the context and from every ending before scoring " " + ending. build-nanogpt, and this
    module, keep `ctx` and the endings exactly as the file has them.
So acc_char_norm isolates the first difference only, and on the raw file it is not expected
to reproduce the harness's number exactly.

Speed. build-nanogpt runs one forward pass per example over four rows, context plus ending,
padded to the longest: the context is computed four times, the padding is computed too, and
the 50,304-wide output layer runs at every position. Here each example becomes one packed
row: the context once, then each ending without its last token. An attention mask lets each
ending see the context and its own earlier tokens but not the other endings, and each
ending's positions restart where the context ends, so every hidden state is the one the
model computes for that ending alone. Many rows go through the model together, sorted by
length so that little padding is needed, and the output layer runs only at positions whose
next token is an ending token (the context's last position once, shared by all endings).
The losses equal the one-example-at-a-time method's up to float rounding; tests hold the two
to the same picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from nanogpt_core.checkpoint import unwrap_model
from nanogpt_core.distributed import DistContext, gather_to_all
from nanogpt_core.eval.examples import EvalData, EvalDataError, Example, examples_sha256
from nanogpt_core.losses import CHUNK_ROWS
from nanogpt_core.model import GPT, GPT2_VOCAB_SIZE
from nanogpt_core.tokenizer import get_tokenizer

# Examples per forward pass. One example's packed row (90 to 160 tokens on HellaSwag) gives
# a CPU's matmuls too few rows to run at full speed; 16 examples give them 1,500 or more.
DEFAULT_BATCH_SIZE = 16
SCORING = ("build-nanogpt: tokens encode(ctx) + encode(' ' + ending), cross-entropy summed over the "
           "ending's tokens; acc_norm per token, acc_char_norm per character of the ending (lm-eval-harness)")


@dataclass(frozen=True)
class RenderedExample:
    ctx_tokens: list[int]
    ending_tokens: list[list[int]]
    ending_chars: list[int]
    label: int
    truncated: bool  # the context lost tokens from its start to fit the model

    @property
    def packed_length(self) -> int:
        return len(self.ctx_tokens) + sum(len(e) - 1 for e in self.ending_tokens)


@dataclass(frozen=True)
class ExampleScore:
    label: int
    losses: tuple[float, ...]  # cross-entropy summed over each ending's tokens
    tokens: tuple[int, ...]
    chars: tuple[int, ...]
    truncated: bool = False

    @property
    def pred(self) -> int:
        return _argmin(self.losses)

    @property
    def pred_norm(self) -> int:
        return _argmin([loss / n for loss, n in zip(self.losses, self.tokens)])

    @property
    def pred_char_norm(self) -> int:
        return _argmin([loss / n for loss, n in zip(self.losses, self.chars)])


def _argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)  # the first of equal values, as torch.argmin


def render_example(example: Example, encoder: Any, block_size: int) -> RenderedExample:
    """Token ids for the context and each ending.

    encode_ordinary gives the same ids as build-nanogpt's encode on any text without
    "<|endoftext|>" in it, and treats that string as text where encode would refuse it.
    A context too long for the model keeps its last tokens, as lm-eval-harness does; HellaSwag
    never needs that at GPT-2's 1,024 positions, the small test models sometimes do.
    """
    ctx = encoder.encode_ordinary(example.ctx)
    endings = [encoder.encode_ordinary(" " + ending) for ending in example.endings]
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise EvalDataError(f"example {example.id}: an ending of {longest} tokens leaves no room for its "
                            f"context in the model's {block_size} positions")
    room = block_size - longest
    truncated = len(ctx) > room
    return RenderedExample(ctx_tokens=ctx[-room:] if truncated else ctx, ending_tokens=endings,
                           ending_chars=[len(e) for e in example.endings], label=example.label, truncated=truncated)


def _vocab_size(model: GPT) -> int:
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than GPT-2's "
                         f"({GPT2_VOCAB_SIZE}); it cannot read GPT-2 tokens")
    return GPT2_VOCAB_SIZE


@torch.inference_mode()
def score_example_unbatched(model: GPT, rendered: RenderedExample, device: str | torch.device = "cpu",
                            ) -> ExampleScore:
    """build-nanogpt's method, kept as the reference: one forward pass over the four rows
    context + ending, zero-padded to the longest, losses masked to the ending tokens."""
    vocab = _vocab_size(model)
    rows = [rendered.ctx_tokens + ending for ending in rendered.ending_tokens]
    width = max(len(row) for row in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(rendered.ctx_tokens):len(row)] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    logits, _ = model(tokens)
    logits = logits[:, :-1, :vocab]
    losses = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1), reduction="none")
    sums = (losses.view(len(rows), -1) * mask[:, 1:]).double().sum(dim=1)
    return ExampleScore(label=rendered.label, losses=tuple(sums.tolist()),
                        tokens=tuple(len(e) for e in rendered.ending_tokens),
                        chars=tuple(rendered.ending_chars), truncated=rendered.truncated)


@dataclass
class PackedBatch:
    """Several examples as packed rows, and where their ending tokens' losses come from."""
    idx: torch.Tensor  # (B, L) token ids
    pos: torch.Tensor  # (B, L) position ids: each ending's restart where the context ends
    attn_mask: torch.Tensor  # (B, 1, L, L) True where a query may attend to a key
    rows: torch.Tensor  # (R,) flat indices into B*L of the hidden states the output layer needs
    pair_row: torch.Tensor  # (P,) for every ending token: which of `rows` predicts it
    pair_target: torch.Tensor  # (P,) the ending token
    pair_ending: torch.Tensor  # (P,) which ending (numbered through the batch) it belongs to
    n_endings: int


CTX_SEGMENT, PAD_SEGMENT = -1, -2


def pack_examples(rendered: Sequence[RenderedExample]) -> PackedBatch:
    width = max(r.packed_length for r in rendered)
    batch = len(rendered)
    idx = torch.zeros((batch, width), dtype=torch.long)
    pos = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), PAD_SEGMENT, dtype=torch.long)
    rows: list[int] = []
    pair_row: list[int] = []
    pair_target: list[int] = []
    pair_ending: list[int] = []
    n_endings = 0
    for b, r in enumerate(rendered):
        n_ctx = len(r.ctx_tokens)
        tokens, positions, segments = list(r.ctx_tokens), list(range(n_ctx)), [CTX_SEGMENT] * n_ctx
        ctx_last = len(rows)  # the context's last hidden state predicts every ending's first token
        rows.append(b * width + n_ctx - 1)
        for i, ending in enumerate(r.ending_tokens):
            start = len(tokens)
            for j, target in enumerate(ending):
                if j == 0:
                    pair_row.append(ctx_last)
                else:
                    pair_row.append(len(rows))
                    rows.append(b * width + start + j - 1)
                pair_target.append(target)
                pair_ending.append(n_endings)
            tokens += ending[:-1]  # the last token is only ever a target
            positions += range(n_ctx, n_ctx + len(ending) - 1)
            segments += [i] * (len(ending) - 1)
            n_endings += 1
        n = len(tokens)
        idx[b, :n] = torch.tensor(tokens)
        pos[b, :n] = torch.tensor(positions)
        segment[b, :n] = torch.tensor(segments)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    # A query sees earlier context and earlier tokens of its own segment. Padding forms one
    # segment of its own, so no real query sees it and no padding query sees nothing (which
    # would make its softmax NaN).
    visible = (segment[:, None, :] == CTX_SEGMENT) | (segment[:, None, :] == segment[:, :, None])
    return PackedBatch(idx=idx, pos=pos, attn_mask=(causal & visible).unsqueeze(1),
                       rows=torch.tensor(rows), pair_row=torch.tensor(pair_row),
                       pair_target=torch.tensor(pair_target), pair_ending=torch.tensor(pair_ending),
                       n_endings=n_endings)


@torch.inference_mode()
def score_packed(model: GPT, rendered: Sequence[RenderedExample], device: str | torch.device = "cpu",
                 ) -> list[ExampleScore]:
    """Score several examples in one forward pass (see "Speed" in the module docstring)."""
    vocab = _vocab_size(model)
    batch = pack_examples(rendered)
    hidden = model.hidden_states(batch.idx.to(device), positions=batch.pos.to(device),
                                 attn_mask=batch.attn_mask.to(device))
    h = hidden.reshape(-1, hidden.size(-1))[batch.rows.to(device)]
    weight = model.lm_head.weight[:vocab]
    pair_row, pair_target = batch.pair_row.to(device), batch.pair_target.to(device)
    token_loss = torch.empty(len(pair_row), device=h.device)
    # The output layer a block of rows at a time, so only one block's logits exist at once.
    # log_softmax is one fused pass over the logits, several times faster than logsumexp.
    for start in range(0, len(h), CHUNK_ROWS):
        log_probs = F.log_softmax(F.linear(h[start:start + CHUNK_ROWS], weight), dim=-1)
        here = (pair_row >= start) & (pair_row < start + CHUNK_ROWS)
        token_loss[here] = -log_probs[pair_row[here] - start, pair_target[here]]
    sums = torch.zeros(batch.n_endings, dtype=torch.float64, device=h.device)
    sums.index_add_(0, batch.pair_ending.to(device), token_loss.double())
    sums = sums.tolist()
    scores, offset = [], 0
    for r in rendered:
        n = len(r.ending_tokens)
        scores.append(ExampleScore(label=r.label, losses=tuple(sums[offset:offset + n]),
                                   tokens=tuple(len(e) for e in r.ending_tokens),
                                   chars=tuple(r.ending_chars), truncated=r.truncated))
        offset += n
    return scores


def score_rendered(model: GPT, rendered: Sequence[RenderedExample], *, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str | torch.device = "cpu") -> list[ExampleScore]:
    """Scores in input order, computed in batches of similar length."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(rendered)), key=lambda i: rendered[i].packed_length)
    scores: list[ExampleScore | None] = [None] * len(rendered)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        for i, score in zip(chosen, score_packed(model, [rendered[i] for i in chosen], device)):
            scores[i] = score
    return scores  # type: ignore[return-value]


def score_examples(model: torch.nn.Module, examples: Sequence[Example], *, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str | torch.device = "cpu", dist_ctx: DistContext | None = None) -> list[ExampleScore]:
    """Every example's scores, in order, on every rank; under torchrun each rank scores its share."""
    bare = unwrap_model(model)
    encoder = get_tokenizer()
    rank, world_size = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None else (0, 1)
    mine = list(range(rank, len(examples), world_size))
    rendered = [render_example(examples[i], encoder, bare.config.block_size) for i in mine]
    was_training = bare.training
    bare.eval()
    try:
        scores = score_rendered(bare, rendered, batch_size=batch_size, device=device)
    finally:
        bare.train(was_training)
    shares = gather_to_all(list(zip(mine, scores)), dist_ctx) if dist_ctx is not None else [list(zip(mine, scores))]
    merged: list[ExampleScore | None] = [None] * len(examples)
    for share in shares:
        for i, score in share:
            merged[i] = score
    return merged  # type: ignore[return-value]


def summarize(scores: Sequence[ExampleScore]) -> dict[str, Any]:
    n = len(scores)
    correct = sum(s.pred == s.label for s in scores)
    correct_norm = sum(s.pred_norm == s.label for s in scores)
    correct_char_norm = sum(s.pred_char_norm == s.label for s in scores)
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n, "acc_char_norm": correct_char_norm / n,
            "correct": correct, "correct_norm": correct_norm, "correct_char_norm": correct_char_norm,
            "n_truncated": sum(s.truncated for s in scores)}


def evaluate_model(model: torch.nn.Module, data: EvalData, *, limit: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device = "cpu",
                   dist_ctx: DistContext | None = None) -> dict[str, Any]:
    """The report for a model already in memory: scores plus what was scored.

    Holds nothing that varies between identical runs (no timings), so a hash of it can
    serve as a data version.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    examples = data.examples[:limit] if limit is not None else data.examples
    scores = score_examples(model, examples, batch_size=batch_size, device=device, dist_ctx=dist_ctx)
    return {"benchmark": data.benchmark, **summarize(scores), "data": data.source,
            "data_sha256": data.file_sha256, "examples_sha256": examples_sha256(examples),
            "limit": limit, "scoring": SCORING}
