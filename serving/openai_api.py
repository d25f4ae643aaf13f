"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions and /v1/models.

A request is validated, turned into prompt tokens and sampling parameters, and submitted
to the current model's engine; the answer is either collected into one response or sent
as server-sent events while the engine produces it. Either way a client that goes away
cancels its generation.

Tokenizing runs in a worker thread, so that a long prompt does not hold up the event loop
(and with it every other request and /health). A response names the model as the client
did: the alias, or the checkpoint name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from nanogpt_core.prompts import chat_to_prompt, prompt_token_ids
from nanogpt_core.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_tokenizer

# The longest GPT-2 token, in bytes (token 35496, a run of mis-decoded UTF-8); checked by the tests.
LONGEST_TOKEN_BYTES = 128
from serving.deployments import ModelRegistry, ServedModel
from serving.engine import (
    CallerOverShare,
    ChoiceEvent,
    EngineClosed,
    EngineFailed,
    Generation,
    QueueFull,
    RequestRejected,
    token_bytes_table,
)
from serving.errors import (
    REQUEST_ID_HEADER,
    APIError,
    ASCIIJSONResponse,
    ascii_json,
    context_length_exceeded,
    invalid_request,
    over_share,
    overloaded,
    request_id_of,
    server_error,
)
from serving.fair_share import caller_queue_share
from serving.metrics import ServerMetrics
from serving.rate_limits import caller_identity
from serving.sampling import LogitBias, SampledToken, SamplingParams
from serving.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorDetail,
    ErrorResponse,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from serving.settings import ServerSettings

router = APIRouter(prefix="/v1")
log = logging.getLogger("serving.api")

_SUBMIT_ATTEMPTS = 3  # a swap can close an engine between resolving a model and submitting to it
_DISCONNECT_POLL_S = 0.25
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer


# Every status the guards and handlers answer with, so the published schema matches the server.
_ERROR = {"model": ErrorResponse}
_ERRORS = {status: _ERROR for status in (400, 401, 404, 413, 415, 422, 429, 500, 503)}
# One server-sent event: `data` holds a JSON chunk, or `[DONE]` at the end of the stream.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
_STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}},
                   "description": "a JSON answer, or server-sent events when `stream` is true"}}


def system_fingerprint(served: ServedModel) -> str:
    """OpenAI's field for the backend behind an answer: here, the checkpoint that produced it."""
    return f"nanogpt-pipeline/{served.checkpoint_name}"


# --- models --------------------------------------------------------------------------------


@router.get("/models", responses=_ERRORS)
def list_models(request: Request) -> ModelList:
    current = _registry(request).current
    return ModelList(data=[current.card(name) for name in current.names])


@router.get("/models/{model_name}", responses=_ERRORS)
def retrieve_model(model_name: Annotated[str, Path(examples=["nanogpt"])], request: Request):
    return _registry(request).resolve(model_name).card(model_name)


# --- chat completions ----------------------------------------------------------------------


@router.post("/chat/completions", responses={**_ERRORS, **_STREAMED})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    request_id_of(request)
    served = _registry(request).resolve(body.model)
    _check_request_size(1, body.n or 1, _settings(request))
    prompt_tokens = await asyncio.to_thread(_chat_prompt_tokens, body, served.context_length)
    top_logprobs = body.top_logprobs or 0
    job = _Job(prompts=[prompt_tokens], n=body.n or 1, stream=bool(body.stream),
               include_usage=bool(body.stream_options and body.stream_options.include_usage),
               params=_sampling_params(body, body.token_limit(), prompt_tokens, served, _settings(request),
                                       logprobs=bool(body.logprobs), top_logprobs=top_logprobs))
    return await _run(job, request, body.model, served, chat=True)


def _chat_prompt_tokens(body: ChatCompletionRequest, context_length: int) -> list[int]:
    try:
        prompt = chat_to_prompt([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                 for m in body.messages])
    except ValueError as e:
        raise invalid_request(str(e), param="messages") from None
    _refuse_if_surely_over_context(prompt, context_length, param="messages")
    return prompt_token_ids(prompt)  # exactly the tokens fine-tuning trained on


def _refuse_if_surely_over_context(text: str, context_length: int, *, param: str) -> None:
    """A 400 before tokenizing for a text that cannot fit: no token is longer than
    `LONGEST_TOKEN_BYTES`, so a text of more than that many bytes per position in the context
    has more tokens than the context holds. Tokenizing a 1 MiB body costs 60-90 ms of CPU."""
    fewest_tokens = -(-len(text.encode("utf-8", errors="surrogatepass")) // LONGEST_TOKEN_BYTES)
    if fewest_tokens > context_length:
        raise context_length_exceeded(context_length, fewest_tokens, None, at_least=True, param=param)


# --- completions ---------------------------------------------------------------------------


@router.post("/completions", responses={**_ERRORS, **_STREAMED})
async def completions(body: CompletionRequest, request: Request):
    request_id_of(request)
    served = _registry(request).resolve(body.model)
    settings = _settings(request)
    _check_request_size(_prompt_count(body.prompt), body.n or 1, settings)
    prompts = await asyncio.to_thread(_completion_prompts, body.prompt, served.context_length)
    echoed = await asyncio.to_thread(_echoed_prompts, prompts) if body.echo else None
    logprobs = body.logprobs is not None
    params = [_sampling_params(body, body.max_tokens, p, served, settings, logprobs=logprobs,
                               top_logprobs=body.logprobs or 0) for p in prompts]
    job = _Job(prompts=prompts, n=body.n or 1, stream=bool(body.stream),
               include_usage=bool(body.stream_options and body.stream_options.include_usage),
               params=params[0], per_prompt_params=params, echoed=echoed)
    return await _run(job, request, body.model, served, chat=False)


def _check_request_size(prompt_count: int, n: int, settings: ServerSettings) -> None:
    # A request larger than its caller's share of the queue could never be queued.
    limit = caller_queue_share(settings.max_queue)
    if prompt_count * n > limit:
        raise invalid_request(
            f"This request asks for {prompt_count * n} completions (prompts: {prompt_count}, n: {n}); "
            f"this server takes at most {limit} per request.", param="n" if n > 1 else "prompt")


def _prompt_count(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def _echoed_prompts(prompts: list[list[int]]) -> list[str]:
    enc = get_tokenizer()
    return [enc.decode([t for t in p if t != EOT_TOKEN]) for p in prompts]


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]],
                        context_length: int) -> list[list[int]]:
    enc = get_tokenizer()
    if isinstance(prompt, str):
        raw = [prompt]
    elif all(isinstance(p, str) for p in prompt):
        raw = list(prompt)
    elif all(isinstance(p, int) for p in prompt):
        raw = [list(prompt)]
    else:
        raw = list(prompt)
    prompts = []
    for item in raw:
        if isinstance(item, str):
            # Documents in the training shards start with <|endoftext|>; a prompt that does
            # too reads to the model as the start of a document.
            _refuse_if_surely_over_context(item, context_length - 1, param="prompt")
            prompts.append([EOT_TOKEN] + enc.encode_ordinary(item))
        else:
            if min(item) < 0 or max(item) >= VOCAB_SIZE:  # each list has a token (the schema says so)
                raise invalid_request(f"Token ids in 'prompt' must lie in [0, {VOCAB_SIZE}).", param="prompt")
            prompts.append(list(item))
    return prompts


# --- shared machinery ----------------------------------------------------------------------


@dataclass
class _Job:
    prompts: list[list[int]]
    n: int
    stream: bool
    include_usage: bool
    params: SamplingParams
    per_prompt_params: list[SamplingParams] | None = None
    echoed: list[str] | None = None  # each prompt's text, when the client asked for it back

    def params_for(self, i: int) -> SamplingParams:
        return self.per_prompt_params[i] if self.per_prompt_params else self.params


def _caller(request: Request) -> str:
    """Whose share a request counts against: the same identity the per-caller limits use."""
    return caller_identity(request.scope, keyed=_settings(request).requires_auth)


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def _metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def _sampling_params(body, requested_max: int | None, prompt_tokens: Sequence[int], served: ServedModel,
                     settings: ServerSettings, *, logprobs: bool, top_logprobs: int) -> SamplingParams:
    limit = served.context_length
    room = limit - len(prompt_tokens)
    if requested_max is None:
        if room < 1:
            raise context_length_exceeded(limit, len(prompt_tokens), None)
        max_tokens = min(settings.default_max_tokens, room)
    elif requested_max > room:
        raise context_length_exceeded(limit, len(prompt_tokens), requested_max)
    else:
        max_tokens = requested_max
    n = body.n or 1
    if n > settings.max_batch:
        raise invalid_request(f"n must be at most {settings.max_batch} on this server.", param="n")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body.token_biases),  # keys checked when the body was validated
        stop=body.stop_sequences(),
        seed=body.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


@functools.lru_cache(maxsize=1)
def _logit_bias(biases: tuple[tuple[int, float], ...]) -> LogitBias | None:
    """The bias tensors of one request, shared by its prompts.

    A request's prompts get their parameters one after another with no await in between,
    so the one entry cached is that request's.
    """
    return LogitBias.of(biases) if biases else None


def _submit(job: _Job, request: Request, model_name: str | None,
            served: ServedModel) -> tuple[list[Generation], ServedModel]:
    """Queue one generation per prompt on the named model's engine; all or none."""
    request_id = request_id_of(request)
    for _ in range(_SUBMIT_ATTEMPTS):
        generations: list[Generation] = []
        try:
            for i, prompt in enumerate(job.prompts):
                generation = Generation(prompt, job.params_for(i), job.n, request_id=request_id,
                                        caller=_caller(request))
                served.engine.submit(generation)
                generations.append(generation)
        except (QueueFull, CallerOverShare, EngineClosed, RequestRejected) as e:
            for generation in generations:
                generation.cancel()
            if isinstance(e, RequestRejected):
                raise invalid_request(e.message, param=e.param, code=e.code) from None
            if isinstance(e, CallerOverShare):
                raise over_share(e.waiting, e.share, e.retry_after_s) from None
            if isinstance(e, QueueFull):
                raise overloaded() from None
            # A new deployment was installed in between: the alias now names it.
            served = _registry(request).resolve(model_name)
            continue
        _metrics(request).prompt_tokens.inc(sum(len(p) for p in job.prompts))
        return generations, served
    raise overloaded()


async def _run(job: _Job, request: Request, model_name: str | None, served: ServedModel, *, chat: bool):
    generations, served = _submit(job, request, model_name, served)
    # The name the client asked for (alias or checkpoint), as OpenAI echoes it.
    shown_name = model_name or served.model_id
    render_class = _ChatRender if chat else _CompletionRender
    render = render_class(job, shown_name, system_fingerprint(served))
    request_id = request_id_of(request)
    if job.stream:
        return StreamingResponse(_event_stream(generations, render, job, request_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          REQUEST_ID_HEADER: request_id})
    try:
        result = await _collect_unless_disconnected(generations, render, request)
        if result is None:
            return Response(status_code=_CLIENT_CLOSED_REQUEST)
    except EngineFailed:
        raise server_error(request_id) from None  # the engine logged the cause under this id
    except RequestRejected as e:
        raise invalid_request(e.message, param=e.param, code=e.code) from None
    except EngineClosed:
        raise overloaded() from None
    return ASCIIJSONResponse(result.model_dump(mode="json"), headers={REQUEST_ID_HEADER: request_id})


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, ChoiceEvent]]:
    """Events of several generations as they come, tagged with the generation's position."""
    if len(generations) == 1:
        async for event in generations[0].stream():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, generation: Generation) -> None:
        try:
            async for event in generation.stream():
                await queue.put((i, event))
            await queue.put((i, None))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _collect_unless_disconnected(generations: list[Generation], render, request: Request):
    async def collect():
        async for i, event in _merged(generations):
            render.add(i, event)
        return render.response(generations)

    task = asyncio.create_task(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
        for generation in generations:
            generation.cancel()


async def _event_stream(generations: list[Generation], render, job: _Job, request_id: str) -> AsyncIterator[str]:
    """The response's events; a failure ends the stream with an OpenAI error event, then [DONE]."""
    try:
        try:
            for chunk in render.opening_chunks():
                yield _sse(chunk, job.include_usage)
            async for i, event in _merged(generations):
                for chunk in render.chunks(i, event):
                    yield _sse(chunk, job.include_usage)
            if job.include_usage:
                yield _sse(render.usage_chunk(generations), True)
        except Exception as e:
            yield _sse_error(_stream_error(e, request_id))
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the stream ends and also when the client disconnects (the task is
        # cancelled): either way the engine drops the samples at its next step.
        for generation in generations:
            generation.cancel()


def _stream_error(error: Exception, request_id: str) -> APIError:
    if isinstance(error, RequestRejected):
        return invalid_request(error.message, param=error.param, code=error.code)
    if isinstance(error, EngineClosed):
        return overloaded()
    if not isinstance(error, EngineFailed):  # the engine logs its own failures
        log.error("request %s: streaming failed", request_id, exc_info=error)
    return server_error(request_id)


def _sse_error(error: APIError) -> str:
    body = ErrorResponse(error=ErrorDetail(message=error.message, type=error.type, param=error.param,
                                           code=error.code))
    return f"data: {ascii_json(body.model_dump())}\n\n"


def _sse(chunk: BaseModel, include_usage: bool) -> str:
    # pydantic's writer fails on a lone surrogate; none can be here, since the only client text
    # a chunk echoes is the model's name, which the schema checks, and generated text is decoded
    # with U+FFFD for what is not UTF-8.
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def _usage(job: _Job, generations: list[Generation]) -> Usage:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(g.completion_tokens for g in generations)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_text(token: int) -> tuple[str, list[int]]:
    data = token_bytes_table()[token]
    return data.decode("utf-8", errors="replace"), list(data)


def _chat_logprobs(tokens: list[SampledToken]) -> ChoiceLogprobs:
    content = []
    for t in tokens:
        text, raw = _token_text(t.token)
        top = []
        for i, lp in t.top:
            top_text, top_raw = _token_text(i)
            top.append(TopLogprob(token=top_text, logprob=lp, bytes=top_raw))
        content.append(TokenLogprob(token=text, logprob=t.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


class _ChatRender:
    """Builds chat.completion and chat.completion.chunk objects from engine events."""

    def __init__(self, job: _Job, model_name: str, fingerprint: str):
        self.job = job
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model_name
        self.fingerprint = fingerprint
        self.texts = [[] for _ in range(job.n)]
        self.tokens: list[list[SampledToken]] = [[] for _ in range(job.n)]
        self.finish: list[str | None] = [None] * job.n

    def add(self, _prompt: int, event: ChoiceEvent) -> None:
        self.texts[event.index].append(event.text)
        self.tokens[event.index].extend(event.tokens)
        if event.finish_reason:
            self.finish[event.index] = event.finish_reason

    def response(self, generations: list[Generation]) -> ChatCompletion:
        choices = [ChatChoice(index=i, message=AssistantMessage(content="".join(self.texts[i])),
                              logprobs=_chat_logprobs(self.tokens[i]) if self.job.params.logprobs else None,
                              finish_reason=self.finish[i] or "stop")
                   for i in range(self.job.n)]
        return ChatCompletion(id=self.id, created=self.created, model=self.model,
                              system_fingerprint=self.fingerprint, choices=choices,
                              usage=_usage(self.job, generations))

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   system_fingerprint=self.fingerprint, choices=choices)

    def opening_chunks(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content=""))])
                for i in range(self.job.n)]

    def chunks(self, _prompt: int, event: ChoiceEvent) -> list[ChatCompletionChunk]:
        out = []
        wants_logprobs = self.job.params.logprobs and event.tokens
        if event.text or wants_logprobs:
            out.append(self._chunk([ChatChunkChoice(
                index=event.index, delta=ChoiceDelta(content=event.text),
                logprobs=_chat_logprobs(event.tokens) if wants_logprobs else None)]))
        if event.finish_reason:
            out.append(self._chunk([ChatChunkChoice(index=event.index, delta=ChoiceDelta(),
                                                    finish_reason=event.finish_reason)]))
        return out

    def usage_chunk(self, generations: list[Generation]) -> ChatCompletionChunk:
        chunk = self._chunk([])
        chunk.usage = _usage(self.job, generations)
        return chunk


class _CompletionRender:
    """Builds text_completion objects; choice index = prompt position * n + sample index."""

    def __init__(self, job: _Job, model_name: str, fingerprint: str):
        self.job = job
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model_name
        self.fingerprint = fingerprint
        count = len(job.prompts) * job.n
        self.texts = [[] for _ in range(count)]
        self.tokens: list[list[SampledToken]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.echoed = job.echoed or [""] * len(job.prompts)

    def _index(self, prompt: int, event: ChoiceEvent) -> int:
        return prompt * self.job.n + event.index

    def add(self, prompt: int, event: ChoiceEvent) -> None:
        i = self._index(prompt, event)
        self.texts[i].append(event.text)
        self.tokens[i].extend(event.tokens)
        if event.finish_reason:
            self.finish[i] = event.finish_reason

    def _logprobs(self, tokens: list[SampledToken], offset: int) -> CompletionLogprobs:
        texts, offsets = [], []
        for t in tokens:
            text = _token_text(t.token)[0]
            texts.append(text)
            offsets.append(offset)
            offset += len(text)
        top = [{_token_text(i)[0]: lp for i, lp in t.top} for t in tokens] if self.job.params.top_logprobs else None
        return CompletionLogprobs(tokens=texts, token_logprobs=[t.logprob for t in tokens], top_logprobs=top,
                                  text_offset=offsets)

    def response(self, generations: list[Generation]) -> Completion:
        choices = []
        for i in range(len(self.texts)):
            echoed = self.echoed[i // self.job.n]
            choices.append(CompletionChoice(
                index=i, text=echoed + "".join(self.texts[i]), finish_reason=self.finish[i] or "stop",
                logprobs=self._logprobs(self.tokens[i], len(echoed)) if self.job.params.logprobs else None))
        return Completion(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                          choices=choices, usage=_usage(self.job, generations))

    def _chunk(self, choices: list[CompletionChoice]) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
                          choices=choices)

    def opening_chunks(self) -> list[Completion]:
        return [self._chunk([CompletionChoice(index=i, text=self.echoed[i // self.job.n], finish_reason=None)])
                for i in range(len(self.texts)) if self.echoed[i // self.job.n]]

    def chunks(self, prompt: int, event: ChoiceEvent) -> list[Completion]:
        i = self._index(prompt, event)
        offset = len(self.echoed[prompt]) + sum(len(t) for t in self.texts[i])
        self.texts[i].append(event.text)
        wants_logprobs = self.job.params.logprobs and event.tokens
        if not (event.text or wants_logprobs or event.finish_reason):
            return []
        return [self._chunk([CompletionChoice(
            index=i, text=event.text, finish_reason=event.finish_reason,
            logprobs=self._logprobs(event.tokens, offset) if wants_logprobs else None)])]

    def usage_chunk(self, generations: list[Generation]) -> Completion:
        chunk = self._chunk([])
        chunk.usage = _usage(self.job, generations)
        return chunk
