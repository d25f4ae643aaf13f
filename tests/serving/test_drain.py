"""The drain that ends running responses before a stopping worker is killed (serving/drain.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from serving.drain import SHUTTING_DOWN_CODE, Drain, DrainMiddleware, shutdown_deadlines


async def endless_stream(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    while True:
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        await asyncio.sleep(0.01)


async def never_answers(scope, receive, send):
    await asyncio.sleep(3600)


async def quick_answer(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


def serve_one_request(app, *, drain_after_s: float | None, grace_s: float = 0.05) -> tuple[int, bytes, bool]:
    """Runs one GET through the drain; returns the status, the body and whether the body was ended."""
    messages: list[dict] = []

    async def receive():
        await asyncio.sleep(3600)  # the client never leaves

    async def send(message):
        messages.append(message)

    async def main():
        drain = Drain(grace_s)
        request = asyncio.create_task(DrainMiddleware(app, drain)({"type": "http", "method": "GET", "path": "/",
                                                                   "headers": []}, receive, send))
        if drain_after_s is not None:
            await asyncio.sleep(drain_after_s)
            drain.begin()
        await asyncio.wait_for(request, timeout=10)

    asyncio.run(main())
    [start] = [m for m in messages if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    ended = messages[-1]["type"] == "http.response.body" and not messages[-1].get("more_body", False)
    return start["status"], body, ended


def test_a_stream_still_running_at_the_deadline_ends_with_an_error_event_and_done():
    status, body, ended = serve_one_request(endless_stream, drain_after_s=0.05)
    events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert status == 200 and ended
    assert len(events) > 2 and events[0] == '{"choices": []}'
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == SHUTTING_DOWN_CODE


def test_a_request_not_yet_answered_at_the_deadline_gets_a_503_to_retry():
    status, body, ended = serve_one_request(never_answers, drain_after_s=0.05)
    assert status == 503 and ended
    assert json.loads(body)["error"] == {"message": "The server is restarting; please retry the request.",
                                         "type": "server_error", "param": None, "code": SHUTTING_DOWN_CODE}


def test_responses_that_end_in_time_are_left_as_they_are():
    assert serve_one_request(quick_answer, drain_after_s=None) == (200, b'{"ok": true}', True)


def test_deadlines_leave_the_worker_time_to_exit_before_gunicorn_kills_it():
    assert shutdown_deadlines(30) == (25.0, 27.5)
    assert shutdown_deadlines(4) == (2.5, 3.25)
    assert shutdown_deadlines(1) == (0.0, 0.25)
    with pytest.raises(ValueError, match="graceful timeout must be positive"):
        shutdown_deadlines(0)
