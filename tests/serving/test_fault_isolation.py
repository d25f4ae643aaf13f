"""A failure in one request's work fails that request alone; the server goes on serving the others.

These tests run the real app in this process (its lifespan loads a real checkpoint and starts
the real engine), so that a fault can be injected into one request's sampling or into the
batched forward pass with monkeypatch.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import torch

import serving.engine
import serving.openai_api
from nanogpt_core.checkpoint import save_checkpoint
from nanogpt_core.model import GPT, GPTConfig
from serving.app import create_app
from serving.settings import ServerSettings
from tests.serving.engine_helpers import (CHAT, FAULT_SEED, GENERIC_500, QUESTIONS, assert_generic_500, chat_body,
                                          fail_sampling_of_marked_requests, sse_events, streamed_text)

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=64))
    with torch.no_grad():
        # Sharp logits, so that greedy choices never hinge on the rounding differences
        # between a batch of one and a batch of eight.
        model.transformer.wte.weight.mul_(40)
    return save_checkpoint(tmp_path_factory.mktemp("fault") / "model_00007.pt", model, step=7)


@asynccontextmanager
async def running_app(checkpoint: Path):
    app = create_app(ServerSettings(checkpoint=checkpoint, max_batch=8))
    async with app.router.lifespan_context(app):
        # As a real server does, answer with the app's own 500 rather than raise in the client.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            yield app, client


async def answer_alone(client: httpx.AsyncClient, question: str) -> str:
    response = await client.post(CHAT, json=chat_body(question))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_a_sampling_fault_fails_only_its_request_while_seven_streams_finish_as_if_alone(checkpoint, monkeypatch,
                                                                                        caplog):
    async def main():
        async with running_app(checkpoint) as (app, client):
            alone = [await answer_alone(client, q) for q in QUESTIONS]
            batch_sizes = fail_sampling_of_marked_requests(monkeypatch, app)
            responses = await asyncio.gather(
                *(client.post(CHAT, json=chat_body(q, stream=True)) for q in QUESTIONS),
                client.post(CHAT, json=chat_body("Count to ten.", seed=FAULT_SEED)))
            return alone, responses, batch_sizes

    with caplog.at_level("ERROR", logger="serving"):
        alone, responses, batch_sizes = asyncio.run(main())
    *streams, faulty = responses
    request_id = assert_generic_500(faulty)
    [logged] = [r for r in caplog.records if request_id in r.getMessage()]
    assert "injected sampling fault" in str(logged.exc_info[1])
    assert batch_sizes and batch_sizes[0] >= 2  # the fault hit while others were decoding
    assert [streamed_text(r) for r in streams] == alone


def test_a_stream_whose_sampling_fails_ends_with_an_error_event_then_done(checkpoint, monkeypatch):
    async def main():
        async with running_app(checkpoint) as (app, client):
            alone = await answer_alone(client, QUESTIONS[0])
            fail_sampling_of_marked_requests(monkeypatch, app)
            return alone, await asyncio.gather(
                client.post(CHAT, json=chat_body("Count to ten.", seed=FAULT_SEED, stream=True)),
                client.post(CHAT, json=chat_body(QUESTIONS[0], stream=True)))

    alone, (faulty, neighbour) = asyncio.run(main())
    events = sse_events(faulty)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "server_error" and GENERIC_500.match(error["message"])
    assert GENERIC_500.match(error["message"]).group(1) == faulty.headers["x-request-id"]
    assert "injected" not in faulty.text
    assert all("choices" in e for e in events[:-2])  # what came before the error was ordinary output
    assert streamed_text(neighbour) == alone


def test_a_failed_batched_forward_fails_that_batch_and_the_next_request_succeeds(checkpoint, monkeypatch):
    async def main():
        async with running_app(checkpoint) as (app, client):
            alone = await answer_alone(client, QUESTIONS[1])
            decoder = app.state.registry.current.engine.decoder
            real_decode = decoder.decode
            calls = {"n": 0}

            def decode_failing_once(tokens):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("injected forward fault")
                return real_decode(tokens)

            monkeypatch.setattr(decoder, "decode", decode_failing_once)
            failed = await client.post(CHAT, json=chat_body(QUESTIONS[1]))
            return alone, failed, await answer_alone(client, QUESTIONS[1])

    alone, failed, after = asyncio.run(main())
    assert_generic_500(failed)
    assert after == alone


def test_health_answers_while_a_prompt_is_being_tokenized(checkpoint, monkeypatch):
    real_prompt_token_ids = serving.openai_api.prompt_token_ids
    tokenizing, health_answered = threading.Event(), threading.Event()
    released_by_health = []

    def slow_prompt_token_ids(prompt: str) -> list[int]:
        tokenizing.set()
        # Held until /health has answered: were this on the event loop, /health could not
        # answer, and the wait would run out instead.
        released_by_health.append(health_answered.wait(20))
        return real_prompt_token_ids(prompt)

    monkeypatch.setattr(serving.openai_api, "prompt_token_ids", slow_prompt_token_ids)

    async def main():
        async with running_app(checkpoint) as (_, client):
            chat = asyncio.create_task(client.post(CHAT, json=chat_body(QUESTIONS[2], max_tokens=4)))
            assert await asyncio.to_thread(tokenizing.wait, 20)
            health = await client.get("/health")
            health_answered.set()
            return health, await chat

    health, chat = asyncio.run(main())
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert released_by_health == [True]
    assert chat.status_code == 200


def test_an_unexpected_error_is_logged_with_the_request_id_the_client_gets(checkpoint, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("internal detail 5f3a")

    monkeypatch.setattr(serving.openai_api, "_sampling_params", broken)

    async def main():
        async with running_app(checkpoint) as (_, client):
            return await client.post(CHAT, json=chat_body(QUESTIONS[3]))

    with caplog.at_level("ERROR", logger="serving"):
        response = asyncio.run(main())
    assert "5f3a" not in response.text
    request_id = assert_generic_500(response)
    [record] = [r for r in caplog.records if request_id in r.getMessage()]
    assert "internal detail 5f3a" in str(record.exc_info[1])
