"""Concurrency against the real server, bounded in count and time, on loopback only."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from tests.serving.conftest import API_KEYS, make_checkpoint

pytestmark = pytest.mark.slow  # against a real server process

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


async def _stream_chat(client, max_tokens: int, **extra) -> tuple[str, str, str, int]:
    stream = await client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=max_tokens,
                                                  stream=True, stream_options={"include_usage": True}, **extra)
    text, finish, model, usage = "", None, None, None
    async for chunk in stream:
        model = chunk.system_fingerprint.rpartition("/")[2]  # the checkpoint that answered
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return text, finish, model, usage


def _async_client(deployment):
    return openai.AsyncOpenAI(base_url=deployment.base_url, api_key=deployment.api_key, max_retries=0, timeout=120)


def test_32_concurrent_streams_all_complete(deployment):
    # From three keys: one key alone may have 8 streams decoding and 16 waiting (its share of
    # the queue); the rest of its requests would be told to retry (429).
    async def main():
        clients = [openai.AsyncOpenAI(base_url=deployment.base_url, api_key=key, max_retries=0, timeout=120)
                   for key in API_KEYS]
        try:
            return await asyncio.wait_for(asyncio.gather(
                *(_stream_chat(clients[i % len(clients)], 24, seed=i) for i in range(32))), timeout=120)
        finally:
            for client in clients:
                await client.close()

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert len(results) == 32
    for _, finish, _, usage in results:
        assert finish in ("stop", "length")
        assert usage is not None and 1 <= usage <= 24
    assert elapsed < 120
    health = deployment.server.health()
    assert health["active_sequences"] == 0 and health["queue_depth"] == 0


def test_disconnected_streams_stop_and_server_stays_responsive(deployment):
    url = deployment.base_url + "/chat/completions"
    body = {"model": "nanogpt", "messages": MESSAGES, "max_tokens": 230, "stream": True}

    async def read_a_little_then_leave(client: httpx.AsyncClient) -> int:
        async with client.stream("POST", url, json=body, headers=deployment.headers()) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= 3:
                        break
            return seen  # leaving the block closes the connection mid-stream

    async def main() -> float:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.wait_for(asyncio.gather(*(read_a_little_then_leave(client) for _ in range(8))), 60)
        disconnected_at = time.monotonic()
        async with _async_client(deployment) as fresh:
            reply = await asyncio.wait_for(
                fresh.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=4), timeout=1.0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        return time.monotonic() - disconnected_at

    generated_before = completion_tokens(deployment)
    answered_after = asyncio.run(main())
    assert answered_after < 1.0
    # The abandoned generations are dropped, not run to their 230 tokens.
    deadline = time.monotonic() + 1.0
    while deployment.server.health()["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert deployment.server.health()["active_sequences"] == 0
    assert completion_tokens(deployment) - generated_before < 8 * 230 / 2


def completion_tokens(deployment) -> float:
    text = httpx.get(deployment.server.url + "/metrics", timeout=10).text
    [line] = [line for line in text.splitlines() if line.startswith("nanogpt_completion_tokens_total ")]
    return float(line.split()[1])


def test_manifest_swap_under_load_fails_no_request(deployment):
    before = deployment.server.health()
    new_step = int(before["checkpoint"][len("model_"):-len(".pt")]) + 1
    new_checkpoint = make_checkpoint(deployment.checkpoint_dir / f"model_{new_step:05d}.pt", seed=new_step,
                                     step=new_step)
    new_name = new_checkpoint.name

    async def keep_asking(client, stop_at: float, results: list) -> None:
        while time.monotonic() < stop_at:
            results.append(await _stream_chat(client, 16))

    async def main():
        results: list = []
        async with _async_client(deployment) as client:
            long_running = [asyncio.create_task(_stream_chat(client, 120)) for _ in range(4)]
            stop_at = time.monotonic() + 4.0
            askers = [asyncio.create_task(keep_asking(client, stop_at, results)) for _ in range(4)]
            await asyncio.sleep(0.5)
            write_manifest(deployment.manifest, new_manifest(
                checkpoint_path=new_checkpoint, deployment_id=f"deploy-{new_step}",
                lineage={"token_shards": f"v{new_step}"},
                scores={"benchmark": "demo-cloze", "acc": 0.3, "acc_norm": 0.31, "n": 100}))
            done = await asyncio.wait_for(asyncio.gather(*long_running, *askers), timeout=120)
        return [r for r in done if r is not None] + results

    results = asyncio.run(main())
    assert len(results) >= 8
    for _, finish, _, usage in results:
        assert finish in ("stop", "length") and usage >= 1
    served_by = {model for _, _, model, _ in results}
    # Requests running at the swap finished on the old model; later ones went to the new.
    assert served_by == {before["checkpoint"], new_name}, served_by
    after = deployment.server.health()
    assert after["checkpoint"] == new_name and after["deployment_id"] == f"deploy-{new_step}"
    card = httpx.get(deployment.base_url + "/models/nanogpt", headers=deployment.headers(), timeout=10).json()
    assert card["checkpoint"] == new_name and card["scores"]["acc"] == 0.3
    metrics = httpx.get(deployment.server.url + "/metrics", timeout=10).text
    assert "nanogpt_model_swaps_total 1.0" in metrics


def test_metrics_report_requests_tokens_latency_and_queue(deployment, openai_client):
    openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=3)
    text = httpx.get(deployment.server.url + "/metrics", timeout=10).text
    for name in ("nanogpt_requests_total", "nanogpt_prompt_tokens_total", "nanogpt_completion_tokens_total",
                 "nanogpt_time_to_first_token_seconds_bucket", "nanogpt_queue_depth",
                 "nanogpt_active_sequences"):
        assert name in text
    assert 'nanogpt_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
