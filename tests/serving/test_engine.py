"""The batched decoder and the engine, in-process: correctness against the reference model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from nanogpt_core.model import GPT, GPTConfig
import serving.engine
from serving.engine import (
    CallerOverShare,
    Engine,
    EngineClosed,
    EngineFailed,
    Generation,
    QueueFull,
    RequestRejected,
)
from serving.kv_decoder import BatchDecoder
from serving.linear_layouts import onednn_available
from serving.sampling import SamplingParams


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=96, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():
        # Sharper logits than a fresh init gives, so that greedy choices never hinge on
        # rounding differences between batched and single-row matmuls.
        gpt.transformer.wte.weight.mul_(40)
    return gpt


def reference_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1, :50257]


@pytest.mark.parametrize("use_onednn", [True, False], ids=["onednn", "addmm"])
def test_prefill_and_decode_match_the_reference_with_rows_of_different_lengths(model, use_onednn):
    if use_onednn and not onednn_available(torch.device("cpu"), torch.float32):
        pytest.skip("this torch build has no oneDNN")
    decoder = BatchDecoder(model, max_batch=4, use_onednn=use_onednn)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    for prompt in prompts:
        # Chunked prefill into the staging slot, then into the batch.
        decoder.clear(decoder.staging_slot)
        decoder.prefill(decoder.staging_slot, prompt[:2])
        logits = decoder.prefill(decoder.staging_slot, prompt[2:]) if len(prompt) > 2 else None
        decoder.allocate(copy_from=decoder.staging_slot)
        if logits is not None:
            torch.testing.assert_close(logits, reference_logits(model, prompt), atol=2e-4, rtol=1e-4)
    sequences = [list(p) for p in prompts]
    for step in range(4):
        fed = [100 + 10 * step + i for i in range(len(sequences))]
        logits = decoder.decode(fed)
        for row, seq in enumerate(sequences):
            seq.append(fed[row])
            torch.testing.assert_close(logits[row], reference_logits(model, seq), atol=2e-4, rtol=1e-4)
    # The first sequence leaves; the last moves into its slot and carries on correctly.
    assert decoder.release(0) == 2
    sequences = [sequences[2], sequences[1]]
    logits = decoder.decode([1, 2])
    for row, seq in enumerate(sequences):
        seq.append([1, 2][row])
        torch.testing.assert_close(logits[row], reference_logits(model, seq), atol=2e-4, rtol=1e-4)


def greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), n, temperature=0, vocab_limit=50257)
    return out[0, len(prompt):].tolist()


async def collect(generation: Generation) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {i: [] for i in range(generation.n)}
    async for event in generation.stream():
        tokens[event.index].extend(t.token for t in event.tokens)
    return tokens


def test_requests_join_and_leave_a_running_batch(model):
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=4), prefill_chunk=3).start()
        try:
            specs = [([1, 2, 3, 4], 12), ([7, 8], 3), ([20, 21, 22, 23, 24, 25, 26], 8), ([30], 6), ([40, 41], 5)]
            generations = []
            for prompt, max_tokens in specs:
                params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=True)
                generations.append(Generation(prompt, params))
                engine.submit(generations[-1])
                await asyncio.sleep(0.005)  # arrive while others are decoding
            results = await asyncio.wait_for(asyncio.gather(*(collect(g) for g in generations)), 30)
        finally:
            engine.stop()
        for (prompt, max_tokens), result in zip(specs, results, strict=True):
            expected = greedy_reference(model, prompt, max_tokens)
            if 50256 in expected:
                expected = expected[:expected.index(50256)]
            assert result[0] == expected

    asyncio.run(main())


def test_seeded_samples_do_not_depend_on_batch_neighbours(model):
    async def run(with_neighbours: bool) -> list[int]:
        engine = Engine(BatchDecoder(model, max_batch=4)).start()
        try:
            others = []
            if with_neighbours:
                for i in range(2):
                    others.append(Generation([50 + i], SamplingParams(max_tokens=30, temperature=1.0)))
                    engine.submit(others[-1])
            mine = Generation([3, 4, 5], SamplingParams(max_tokens=15, temperature=0.8, seed=42, logprobs=True))
            engine.submit(mine)
            result = await asyncio.wait_for(collect(mine), 30)
            for other in others:
                other.cancel()
            return result[0]
        finally:
            engine.stop()

    assert asyncio.run(run(False)) == asyncio.run(run(True))


def test_cancel_drops_the_sample_at_the_next_step(model):
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=2)).start()
        try:
            generation = Generation([1, 2], SamplingParams(max_tokens=90, temperature=1.0, logprobs=True))
            engine.submit(generation)
            await generation.events.get()
            generation.cancel()
            deadline = time.monotonic() + 2
            while engine.active_sequences and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.active_sequences == 0
            assert generation.completion_tokens < 90
        finally:
            engine.stop()

    asyncio.run(main())


def test_queue_limit_and_draining(model):
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=1), max_queue=4)  # one caller's share: 1
        # Not started: nothing leaves the queue.
        for caller in "abcd":
            engine.submit(Generation([1], SamplingParams(max_tokens=2), caller=caller))
        with pytest.raises(QueueFull):
            engine.submit(Generation([1], SamplingParams(max_tokens=2), caller="e"))
        engine.start()
        engine.close()
        assert await asyncio.to_thread(engine.drained.wait, 10)
        with pytest.raises(EngineClosed):
            engine.submit(Generation([1], SamplingParams(max_tokens=2)))

    asyncio.run(main())


def test_a_request_reaching_an_engine_released_by_a_swap_is_told_to_resubmit(model):
    # A hot swap closes the old engine and, once it has drained, drops its decoder; a request
    # that picked the old engine just before the swap still submits to it.
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=1)).start()
        engine.close()
        assert await asyncio.to_thread(engine.drained.wait, 10)
        engine.decoder = None
        with pytest.raises(EngineClosed):
            engine.submit(Generation([1], SamplingParams(max_tokens=2), n=2))

    asyncio.run(main())


def test_a_failed_step_fails_its_requests_and_the_engine_recovers(model, monkeypatch):
    async def main():
        decoder = BatchDecoder(model, max_batch=2)
        engine = Engine(decoder).start()
        real_decode = decoder.decode
        calls = {"n": 0}

        def flaky_decode(tokens):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated failure")
            return real_decode(tokens)

        monkeypatch.setattr(decoder, "decode", flaky_decode)
        try:
            doomed = Generation([1, 2], SamplingParams(max_tokens=10, logprobs=True))
            engine.submit(doomed)
            with pytest.raises(EngineFailed) as failed:
                await asyncio.wait_for(collect(doomed), 10)
            assert "simulated" not in str(failed.value)
            assert failed.value.request_id == doomed.request_id and doomed.request_id in str(failed.value)
            fine = Generation([1, 2], SamplingParams(max_tokens=5, logprobs=True))
            engine.submit(fine)
            assert len((await asyncio.wait_for(collect(fine), 10))[0]) == 5
        finally:
            engine.stop()

    asyncio.run(main())


def expected_greedy(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    tokens = greedy_reference(model, prompt, max_tokens)
    return tokens[:tokens.index(50256)] if 50256 in tokens else tokens


# Prompts that run side by side with a request that is made to fail.
NEIGHBOURS = [[3, 4, 5], [60, 61], [7, 8, 9, 10, 11], [90]]


async def run_beside(engine: Engine, victim: Generation, max_tokens: int = 16) -> list[list[int]]:
    """Start the neighbours and the victim in one batch (the victim in a middle slot); the neighbours' tokens."""
    neighbours = [Generation(p, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=True))
                  for p in NEIGHBOURS]
    for generation in [neighbours[0], victim, *neighbours[1:]]:
        engine.submit(generation)
    results = await asyncio.wait_for(asyncio.gather(*(collect(g) for g in neighbours)), 30)
    return [r[0] for r in results]


def test_a_sampling_failure_ends_only_its_own_request(model, monkeypatch):
    real_sample_token = serving.engine.sample_token
    victim_params = SamplingParams(max_tokens=16, temperature=0, logprobs=True, seed=666)
    failed_while_running = []

    def sample_token_failing_for_the_victim(logits, params, generator, counts):
        if params is victim_params and counts.total == 3:
            failed_while_running.append(engine.active_sequences)
            raise RuntimeError("injected sampling fault")
        return real_sample_token(logits, params, generator, counts)

    monkeypatch.setattr(serving.engine, "sample_token", sample_token_failing_for_the_victim)

    async def main():
        victim = Generation([20, 21, 22], victim_params, n=2)
        try:
            neighbours = await run_beside(engine, victim)
            with pytest.raises(EngineFailed) as failed:
                await asyncio.wait_for(collect(victim), 10)
            after = Generation([40, 41], SamplingParams(max_tokens=5, temperature=0, logprobs=True))
            engine.submit(after)
            return neighbours, failed.value, victim, (await asyncio.wait_for(collect(after), 10))[0]
        finally:
            engine.stop()

    engine = Engine(BatchDecoder(model, max_batch=6)).start()
    neighbours, error, victim, after = asyncio.run(main())
    assert failed_while_running and failed_while_running[0] >= 4  # it failed inside a running batch
    for prompt, tokens in zip(NEIGHBOURS, neighbours, strict=True):
        assert tokens == expected_greedy(model, prompt, 16)
    assert error.request_id == victim.request_id and "injected" not in str(error)
    assert after == expected_greedy(model, [40, 41], 5)


def test_a_prefill_failure_ends_only_its_own_request(model, monkeypatch):
    decoder = BatchDecoder(model, max_batch=6)
    real_prefill = decoder.prefill
    victim_prompt = [33, 34, 35, 36]

    def prefill_failing_for_the_victim(slot, tokens):
        if tokens == victim_prompt:
            raise RuntimeError("injected prefill fault")
        return real_prefill(slot, tokens)

    monkeypatch.setattr(decoder, "prefill", prefill_failing_for_the_victim)

    async def main():
        victim = Generation(victim_prompt, SamplingParams(max_tokens=8, temperature=0))
        try:
            neighbours = await run_beside(engine, victim)
            with pytest.raises(EngineFailed):
                await asyncio.wait_for(collect(victim), 10)
            return neighbours
        finally:
            engine.stop()

    engine = Engine(decoder).start()
    for prompt, tokens in zip(NEIGHBOURS, asyncio.run(main()), strict=True):
        assert tokens == expected_greedy(model, prompt, 16)


def test_a_request_that_cannot_fit_is_rejected_before_it_is_queued(model):
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=2))
        with pytest.raises(RequestRejected) as too_many:
            engine.submit(Generation([1], SamplingParams(max_tokens=2), n=3))
        assert too_many.value.param == "n"
        with pytest.raises(RequestRejected) as too_long:
            engine.submit(Generation(list(range(90)), SamplingParams(max_tokens=8)))
        assert too_long.value.code == "context_length_exceeded"
        assert engine.queue_depth == 0

    asyncio.run(main())


# --- sharing the slots and the queue between callers ---------------------------------------


def test_a_callers_share_of_the_queue_is_a_quarter_of_it_and_others_are_still_admitted(model):
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=2), max_queue=8)  # not started: nothing leaves the queue
        engine.submit(Generation([1], SamplingParams(max_tokens=2), n=2, caller="greedy"))
        with pytest.raises(CallerOverShare) as over:
            engine.submit(Generation([1], SamplingParams(max_tokens=2), caller="greedy"))
        assert (over.value.waiting, over.value.share) == (2, 2) and over.value.retry_after_s >= 1
        for caller in ("second", "third", "fourth"):  # three callers at their share still leave room
            engine.submit(Generation([1], SamplingParams(max_tokens=2), n=2, caller=caller))
        with pytest.raises(QueueFull):
            engine.submit(Generation([1], SamplingParams(max_tokens=2), caller="fifth"))
        assert engine.queue_depth == 8

    asyncio.run(main())


def test_a_request_with_more_samples_than_free_slots_is_admitted_in_parts(model, monkeypatch):
    decoder = BatchDecoder(model, max_batch=3)
    real_decode = decoder.decode

    def unhurried_decode(tokens):  # steps slow enough to watch the batch between them
        time.sleep(0.01)
        return real_decode(tokens)

    monkeypatch.setattr(decoder, "decode", unhurried_decode)

    async def main():
        engine = Engine(decoder).start()
        try:
            running = Generation([1], SamplingParams(max_tokens=60, temperature=0))
            engine.submit(running)
            while not engine.active_sequences:
                await asyncio.sleep(0.001)
            generation = Generation([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, logprobs=True), n=3)
            engine.submit(generation)  # two slots are free: two samples start now, the third later
            collecting = asyncio.ensure_future(collect(generation))
            seen_in_parts = False
            while not collecting.done():
                seen_in_parts |= engine.active_sequences == 3 and engine.queue_depth == 1
                await asyncio.sleep(0.001)
            await asyncio.wait_for(collect(running), 30)
            return seen_in_parts, collecting.result()
        finally:
            engine.stop()

    seen_in_parts, samples = asyncio.run(main())
    assert seen_in_parts
    assert sorted(samples) == list(range(3))
    assert all(tokens == expected_greedy(model, [5, 6, 7], 12) for tokens in samples.values())


async def finishing_order(generations: list[Generation]) -> tuple[list[Generation], list[dict[int, list[int]]]]:
    """The generations in the order they finished, and each one's tokens."""
    order: list[Generation] = []

    async def run(generation: Generation) -> dict[int, list[int]]:
        tokens = await collect(generation)
        order.append(generation)
        return tokens

    return order, await asyncio.wait_for(asyncio.gather(*(run(g) for g in generations)), 60)


@pytest.mark.parametrize("cache", ["set aside", "rebuilt"])
def test_a_caller_holding_every_slot_hands_back_what_is_beyond_its_share_when_another_arrives(model, cache,
                                                                                             monkeypatch):
    seeded = SamplingParams(max_tokens=70, temperature=0.9, seed=7, logprobs=True)
    if cache == "rebuilt":  # as when set-aside caches would exceed a batch's worth: prefilled again
        monkeypatch.setattr(Engine, "_can_set_aside", lambda self, positions: False)

    async def run(with_second_caller: bool):
        engine = Engine(BatchDecoder(model, max_batch=4)).start()
        try:
            first = Generation([1, 2, 3], SamplingParams(max_tokens=70, temperature=0, logprobs=True), n=3,
                               caller="first")
            first_seeded = Generation([9, 8], seeded, caller="first")
            engine.submit(first)
            engine.submit(first_seeded)
            while engine.active_sequences < 4:  # alone, it takes every slot
                await asyncio.sleep(0.001)
            generations = [first, first_seeded]
            if with_second_caller:
                second = Generation([40, 41], SamplingParams(max_tokens=6, temperature=0, logprobs=True), n=2,
                                    caller="second")
                engine.submit(second)
                generations.append(second)
            order, tokens = await finishing_order(generations)
            return order, engine.preemptions, tokens[:2]
        finally:
            engine.stop()

    alone_order, alone_preemptions, alone_tokens = asyncio.run(run(False))
    order, preemptions, tokens = asyncio.run(run(True))
    assert alone_preemptions == 0
    assert preemptions == 2  # the first caller held 4 of 4 slots; its share is 2
    assert order[0].caller == "second"  # six tokens, not queued behind seventy
    # Preempted samples resume where they stopped: greedy and seeded samples come out as when alone.
    assert tokens == alone_tokens
    assert all(t == expected_greedy(model, [1, 2, 3], 70) for t in tokens[0].values())


def test_callers_are_served_in_turn_rather_than_in_arrival_order(model):
    async def main():
        engine = Engine(BatchDecoder(model, max_batch=1))
        early = [Generation([i + 1], SamplingParams(max_tokens=4, temperature=0), caller="early") for i in range(4)]
        late = Generation([50], SamplingParams(max_tokens=4, temperature=0), caller="late")
        for generation in [*early, late]:  # all queued before the engine starts
            engine.submit(generation)
        engine.start()
        try:
            return (await finishing_order([*early, late]))[0], late
        finally:
            engine.stop()

    order, late = asyncio.run(main())
    assert order.index(late) == 1  # after the early caller's first request, not after all four


def test_a_long_prefill_is_set_aside_for_another_callers_turn_and_continues_where_it_stopped(model):
    long_prompt = list(range(100, 160))

    async def main():
        engine = Engine(BatchDecoder(model, max_batch=4), prefill_chunk=8)
        long = Generation(long_prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=True), caller="long")
        short = Generation([7, 8, 9], SamplingParams(max_tokens=12, temperature=0, logprobs=True), caller="short")
        engine.submit(long)
        engine.submit(short)  # both waiting before the first step: the long prompt goes first
        engine.start()
        try:
            return await finishing_order([long, short]), long, short
        finally:
            engine.stop()

    (order, tokens), long, short = asyncio.run(main())
    assert short.first_token_at < long.first_token_at  # not held up behind sixty prompt tokens
    assert tokens[0][0] == expected_greedy(model, long_prompt, 12)
    assert tokens[1][0] == expected_greedy(model, [7, 8, 9], 12)


def test_two_callers_long_prefills_take_turns_and_both_finish(model):
    # Each turn advances a prefill by at least one chunk before it may be set aside again; two
    # half-done prompts would otherwise hand the staging slot back and forth for ever.
    prompts = {"first": list(range(200, 230)), "second": list(range(300, 330))}

    async def main():
        engine = Engine(BatchDecoder(model, max_batch=4), prefill_chunk=8)
        generations = [Generation(prompt, SamplingParams(max_tokens=6, temperature=0), caller=caller)
                       for caller, prompt in prompts.items()]
        for generation in generations:
            engine.submit(generation)
        engine.start()
        try:
            return (await finishing_order(generations))[1]
        finally:
            engine.stop()

    tokens = asyncio.run(main())
    for (caller, prompt), result in zip(prompts.items(), tokens, strict=True):
        assert result[0] == expected_greedy(model, prompt, 6), caller
