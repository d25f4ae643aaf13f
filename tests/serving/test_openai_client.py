"""The official `openai` client against the real server, unchanged."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # against a real server process

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Name three colours."}]


def test_chat_completion(openai_client):
    reply = openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=12)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == "nanogpt"  # the name asked for
    assert reply.system_fingerprint.startswith("nanogpt-pipeline/model_")  # the checkpoint that answered
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_accepts_max_completion_tokens_and_content_parts(openai_client):
    reply = openai_client.chat.completions.create(
        model="nanogpt", max_completion_tokens=5, user="someone",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    assert reply.usage.completion_tokens <= 5


def test_chat_streaming_with_usage(openai_client):
    stream = openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=16, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert usage_chunk.usage.completion_tokens >= 1
    assert isinstance(text, str)


def test_chat_n2_gives_two_different_choices(openai_client):
    reply = openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=10, n=2,
                                                  temperature=1.0, seed=7)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    assert 2 <= reply.usage.completion_tokens <= 20


def test_chat_n2_streaming(openai_client):
    stream = openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=8, n=2,
                                                   stream=True)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts[0] and texts[1]


def test_seed_reproduces_output(openai_client):
    def run():
        return openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=20,
                                                     temperature=1.0, seed=1234).choices[0].message.content
    first, second = run(), run()
    assert first == second
    other = openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=20,
                                                  temperature=1.0, seed=4321).choices[0].message.content
    assert other != first


def test_chat_logprobs(openai_client):
    reply = openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=6, logprobs=True,
                                                  top_logprobs=3, temperature=0)
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy decoding picks the most likely token, so it leads the top list.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_stop_string_spanning_tokens_is_never_emitted(openai_client):
    # A seeded sample repeats itself exactly, so the second run produces the same tokens up
    # to the stop string.
    seeded = dict(model="nanogpt", messages=MESSAGES, max_tokens=40, temperature=1.0, seed=99, logprobs=True)
    full = openai_client.chat.completions.create(**seeded).choices[0]
    tokens = [t.token for t in full.logprobs.content]
    text = full.message.content
    # A stop string made of the last two characters of one token and the first two of the
    # next lies across a token boundary; pick the first boundary where that is unambiguous.
    stop = None
    for k in range(1, len(tokens) - 1):
        prefix = "".join(tokens[:k])
        if not text.startswith(prefix + tokens[k]):
            break  # a token that is not whole UTF-8 on its own; the text no longer lines up
        candidate = text[len(prefix) - 2:len(prefix) + 2]
        if len(tokens[k - 1]) >= 2 and len(tokens[k]) >= 2 and text.find(candidate) == len(prefix) - 2:
            stop = candidate
            break
    assert stop is not None, f"no usable token boundary in {tokens!r}"
    expected = text[:len(prefix) - 2]

    stopped = openai_client.chat.completions.create(**seeded, stop=[stop, "never-appears-xyz"]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == expected
    assert stop not in stopped.message.content

    streamed = openai_client.chat.completions.create(**seeded, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_completions(openai_client):
    reply = openai_client.completions.create(model="nanogpt", prompt="Once upon a time", max_tokens=8)
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion"
    [choice] = reply.choices
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8


def test_completions_by_checkpoint_name_with_logprobs_and_n(openai_client):
    checkpoint = [m.id for m in openai_client.models.list().data if m.id.endswith(".pt")][0]
    reply = openai_client.completions.create(model=checkpoint, prompt=["One", "Two"], max_tokens=4, n=2,
                                             logprobs=2, temperature=0.7)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for choice in reply.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_completions_streaming_with_usage(openai_client):
    stream = openai_client.completions.create(model="nanogpt", prompt="The weather", max_tokens=10, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] in ("stop", "length")


def test_models_list_and_lineage(openai_client):
    models = openai_client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "nanogpt" and ids[1].startswith("model_") and ids[1].endswith(".pt")
    card = openai_client.models.retrieve("nanogpt")
    extra = card.model_extra
    assert extra["checkpoint"] == ids[1]
    assert extra["scores"]["benchmark"] == "demo-cloze"
    assert extra["lineage"]["git_commit"] == "0" * 40
    assert extra["lineage"]["token_shards"]
    assert extra["deployment_id"]


def test_wrong_key_raises_authentication_error(deployment):
    bad = openai.OpenAI(base_url=deployment.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=2)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    second_key = openai.OpenAI(base_url=deployment.base_url, api_key="sk-test-second", max_retries=0)
    assert second_key.models.list().data


def test_unknown_model_raises_not_found(openai_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert caught.value.code == "model_not_found"


def test_a_temperature_far_below_any_useful_value_answers_with_the_greedy_text(openai_client):
    def answer(temperature: float) -> str:
        return openai_client.chat.completions.create(model="nanogpt", messages=MESSAGES, max_tokens=16,
                                                     temperature=temperature).choices[0].message.content
    assert answer(1e-39) == answer(0)
