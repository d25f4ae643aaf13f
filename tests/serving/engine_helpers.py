"""What several serving test modules share: a model with clear greedy winners, chat request
bodies, reading streamed replies, and injecting a sampling fault into marked requests."""

from __future__ import annotations

import json
import re

import httpx
import torch

import serving.engine
from nanogpt_core.model import GPT, GPTConfig

CHAT = "/v1/chat/completions"
GENERIC_500 = re.compile(r"^The server had an error while processing your request\. Request id: (req_[0-9a-f]{32})\.$")
FAULT_SEED = 666  # marks the request whose sampling is made to fail
QUESTIONS = ["Name a colour.", "What is two plus two?", "Tell me about rivers.", "Say hello.",
             "Why is the sky blue?", "List three fruits.", "Who wrote poems?"]


def decisive_model(config: GPTConfig, seed: int) -> GPT:
    """A random model whose greedy choices have clear winners, as a trained model's do.

    A fresh init keeps the blocks' outputs small, so the model repeats its input token, with
    logits so flat that the argmax hinges on rounding. Louder blocks and a sharper final norm
    give varied continuations with margins far above rounding differences between kernels.
    """
    torch.manual_seed(seed)
    gpt = GPT(config).eval()
    with torch.no_grad():
        for block in gpt.transformer.h:
            block.mlp.c_fc.weight.mul_(20 / 3)
            block.mlp.c_proj.weight.mul_(20)
            block.attn.c_proj.weight.mul_(20)
        gpt.transformer.ln_f.weight.mul_(4)
    return gpt


def chat_body(question: str, **extra) -> dict:
    return {"model": "nanogpt", "messages": [{"role": "user", "content": question}], "max_tokens": 24,
            "temperature": 0, **extra}


def sse_events(response: httpx.Response) -> list:
    """The payloads of a server-sent event stream, "[DONE]" as a string."""
    assert response.status_code == 200, response.text
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(response: httpx.Response) -> str:
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("error" not in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


def fail_sampling_of_marked_requests(monkeypatch, app) -> list[int]:
    """Make sampling raise for requests with FAULT_SEED at their third token; the batch sizes it failed in."""
    real_sample_token = serving.engine.sample_token
    batch_sizes: list[int] = []

    def sample_token(logits, params, generator, counts):
        if params.seed == FAULT_SEED and counts.total == 3:
            batch_sizes.append(app.state.registry.current.engine.active_sequences)
            raise RuntimeError("injected sampling fault")
        return real_sample_token(logits, params, generator, counts)

    monkeypatch.setattr(serving.engine, "sample_token", sample_token)
    return batch_sizes


def assert_generic_500(response: httpx.Response) -> str:
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "injected" not in response.text and "Error" not in response.text
    match = GENERIC_500.match(error["message"])
    assert match, error["message"]
    assert response.headers["x-request-id"] == match.group(1)
    return match.group(1)
