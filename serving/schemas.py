"""Request and response bodies of the OpenAI API, field for field, as pydantic models.

Requests are validated strictly (a string where a number belongs is an error, as OpenAI
treats it) and unknown fields are ignored, because real clients send extras (`user`,
`parallel_tool_calls`, ...) that a plain text model has no use for.

Text from a client may not hold a lone surrogate (`"\\ud800"` is valid JSON, but no UTF-8
encodes it): it would otherwise reach the tokenizer, and any answer that echoes it, as a
character that cannot be written out.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from nanogpt_core.tokenizer import VOCAB_SIZE

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# Held-back text and the stop-string matchers grow with a stop string's length; no real
# stop string comes near this.
MAX_STOP_SEQUENCE_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_N = 8
# OpenAI's limit. The bias is one tensor operation per step whatever its size, but the
# entries are parsed and checked per request on the event loop.
MAX_LOGIT_BIAS = 300
# Validating and rendering a chat costs per message, on the event loop. A chat this long does
# not fit a GPT-2 context (1,024 tokens) anyway: every message that is not empty renders to a
# few tokens at least. Checked before the messages themselves are validated.
MAX_MESSAGES = 1024

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(text: str) -> str:
    if not text.isascii() and _LONE_SURROGATE.search(text):
        raise ValueError("the text holds a lone UTF-16 surrogate (such as \\ud800), which is not a character; "
                         "send valid Unicode")
    return text


def _no_lone_surrogates_in_any(texts: list[str]) -> list[str]:
    # One scan of the joined texts rather than a Python call per item: a 1 MiB list of
    # one-letter strings has a quarter of a million of them.
    _no_lone_surrogates("".join(texts))
    return texts


# Any text a client sends that is read, echoed or tokenized.
ClientText = Annotated[str, AfterValidator(_no_lone_surrogates)]
ClientTexts = Annotated[list[str], AfterValidator(_no_lone_surrogates_in_any)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextContentPart(_Request):
    type: Literal["text"]
    text: ClientText


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: ClientText | list[TextContentPart] | None = None
    name: ClientText | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _SamplingFields(_Request):
    model: ClientText | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; llama.cpp and vLLM take it
    stop: ClientText | Annotated[ClientTexts, Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # OpenAI's is an int64
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: ClientText | None = None

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_is_small(cls, logit_bias: object) -> object:
        # Before the entries are validated, so that a larger one costs nothing more.
        if isinstance(logit_bias, dict) and len(logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(logit_bias)}")
        return logit_bias

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys_are_token_ids(cls, logit_bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in logit_bias or ():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < VOCAB_SIZE:
                raise ValueError(f"logit_bias keys must be token ids in [0, {VOCAB_SIZE}), got {key[:32]!r}")
        return logit_bias

    @cached_property
    def token_biases(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs, its keys parsed once for all of a request's prompts."""
        return tuple((int(key), float(bias)) for key, bias in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop_sequences_are_short(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for s in [stop] if isinstance(stop, str) else stop or ():
            if len(s) > MAX_STOP_SEQUENCE_CHARS:
                raise ValueError(f"each stop sequence may be at most {MAX_STOP_SEQUENCE_CHARS} characters, "
                                 f"got one of {len(s)}")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_are_few(cls, messages: object) -> object:
        if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
            raise ValueError(f"a chat may have at most {MAX_MESSAGES} messages, got {len(messages)}")
        return messages

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: ClientText | Annotated[ClientTexts, Field(min_length=1)] \
        | Annotated[list[int], Field(min_length=1)] \
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # OpenAI's legacy limit
    echo: bool | None = False
    suffix: ClientText | None = None


# --- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        # OpenAI sends only what a delta changes: the role once, then content, then {}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """OpenAI's model object, plus where the model came from (fields OpenAI lacks)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanogpt-pipeline"
    checkpoint: str
    context_length: int
    weights: str = "fp32"  # how the engine holds the weights: fp32 as trained, or int8
    # fp32: the layout each role's single-row products go through, timed fastest on this machine
    # when the model loaded (serving.linear_layouts); empty for int8
    weight_layouts: dict[str, str] = {}
    deployment_id: str | None = None
    lineage: dict | None = None
    scores: dict | None = None
    deployed_at: str | None = None
    # the checkpoint's report card (nanogpt_core.report_card), when one was written beside it
    report_card: dict | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
