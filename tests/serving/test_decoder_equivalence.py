"""With fp32 weights the serving engine's greedy output is the reference model's, token for token."""

from __future__ import annotations

import asyncio

import pytest
import torch

from nanogpt_core.model import GPT, GPTConfig
from serving.engine import Engine, Generation
from serving.kv_decoder import BatchDecoder
from serving.linear_layouts import LAYOUTS as WEIGHT_LAYOUTS
from serving.linear_layouts import onednn_available
from serving.sampling import SamplingParams
from tests.serving.engine_helpers import decisive_model

NEW_TOKENS = 32
PROMPTS = [[464, 2068, 7586, 21831], [50256], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3666, 318]]


@pytest.fixture(scope="module")
def model() -> GPT:
    return decisive_model(GPTConfig(block_size=128, n_layer=3, n_head=4, n_embd=64), seed=3)


def generate_reference(model: GPT, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), NEW_TOKENS, temperature=0)
    tokens = out[0, len(prompt):].tolist()
    # The premise: at every step the winner leads by far more than fp32 rounding between kernels.
    with torch.no_grad():
        logits = model(out[:, :-1])[0][0, len(prompt) - 1:, :50257]
    best_two = logits.topk(2).values
    assert (best_two[:, 0] - best_two[:, 1]).min() > 1e-3
    return tokens


def engine_greedy(decoder: BatchDecoder, prompts: list[list[int]]) -> list[list[int]]:
    """Run every prompt through one engine at once (they share decode steps) and collect the tokens."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)

    async def main():
        engine = Engine(decoder, prefill_chunk=5).start()
        try:
            generations = [Generation(p, params) for p in prompts]
            for g in generations:
                engine.submit(g)

            async def tokens(g: Generation) -> list[int]:
                return [t.token async for event in g.stream() for t in event.tokens]

            return await asyncio.gather(*(tokens(g) for g in generations))
        finally:
            engine.stop()

    return asyncio.run(main())


# Every layout the fp32 engine may send single rows through (products of several rows use
# oneDNN's batch layout), and `addmm` on transposed weights where torch has no oneDNN.
LAYOUTS = {f"onednn, single rows {layout}": dict(use_onednn=True, one_row=layout) for layout in WEIGHT_LAYOUTS}
LAYOUTS |= {"no oneDNN, single rows transposed": dict(use_onednn=False, one_row="transposed"),
            "no oneDNN, single rows plain": dict(use_onednn=False, one_row="plain"),
            "as timed on this machine": dict(use_onednn=None, one_row=None)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_output_alone_and_in_a_batch_is_token_identical_to_gpt_generate(model, layout):
    options = LAYOUTS[layout]
    if options["use_onednn"] is True and not onednn_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch build has no oneDNN")
    expected = [generate_reference(model, p) for p in PROMPTS]
    # Varied, distinct outputs: a repeated token or a mix-up between rows would show.
    assert all(len(set(e)) > NEW_TOKENS // 2 for e in expected)
    assert len({tuple(e) for e in expected}) == len(PROMPTS)

    single = BatchDecoder(model, max_batch=1, **options)
    alone = [engine_greedy(single, [p])[0] for p in PROMPTS]
    together = engine_greedy(BatchDecoder(model, max_batch=len(PROMPTS), **options), PROMPTS)

    assert alone == expected
    assert together == expected
