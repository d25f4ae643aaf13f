"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

FastAPI's own answers (a 422 with a `detail` list, a 404 `{"detail": "Not Found"}`) would
break clients that parse OpenAI's body, so every handler here returns the OpenAI shape, and
anything unexpected becomes a 500 in that shape rather than a bare traceback.

No exception text ever reaches a client: a server-side failure is logged with a request id,
and the client gets a generic message carrying that id (also in the `x-request-id` header)
so that the two can be matched up.

Every JSON answer is written with non-ASCII characters escaped. A client's text can be
echoed (a model name in a 404), and valid JSON may carry a lone surrogate (`"\\ud800"`) that
no UTF-8 encodes: written as `\\ud800`, it is returned as sent instead of failing the answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import GENERIC_FAILURE_MESSAGE, new_request_id
from serving.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("serving")

REQUEST_ID_HEADER = "x-request-id"


def ascii_json(content: Any) -> str:
    """JSON with every non-ASCII character escaped, so that any string at all can be written."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None, separators=(",", ":"))


class ASCIIJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return ascii_json(content).encode("ascii")


def request_id_of(request: Request) -> str:
    """The id this request's failures are logged under; made on first use."""
    request_id = getattr(request.state, "request_id", None)
    if request_id is None:
        request_id = request.state.request_id = new_request_id()
    return request_id


def _known_request_id(request: Request) -> dict[str, str]:
    request_id = getattr(request.state, "request_id", None)
    return {REQUEST_ID_HEADER: request_id} if request_id else {}


class APIError(Exception):
    """An error the client is told about, with OpenAI's status, type and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                              headers=self.headers)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, param=param, code=code))
    return ASCIIJSONResponse(body.model_dump(), status_code=status, headers=headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def server_error(request_id: str) -> APIError:
    return APIError(500, f"{GENERIC_FAILURE_MESSAGE} Request id: {request_id}.", type="server_error",
                    headers={REQUEST_ID_HEADER: request_id})


def model_not_found(name: str, served: tuple[str, ...]) -> APIError:
    listed = " or ".join(f"'{n}'" for n in served)
    return APIError(404, f"The model '{name}' does not exist; this server serves {listed} (GET /v1/models).",
                    param="model", code="model_not_found")


def model_replaced(name: str, served: tuple[str, ...]) -> APIError:
    alias, checkpoint = served
    return APIError(404, f"The model '{name}' is no longer served: it was replaced by '{checkpoint}', "
                         f"which is also available as '{alias}'.",
                    param="model", code="model_not_found")


def context_length_exceeded(limit: int, prompt_tokens: int, completion_tokens: int | None, *,
                            at_least: bool = False, param: str = "messages") -> APIError:
    if at_least:  # counted from the text's length alone, without tokenizing it
        detail = f"your prompt has at least {prompt_tokens} tokens"
    elif completion_tokens is None:
        detail = f"your prompt has {prompt_tokens} tokens, which leaves no room for a completion"
    else:
        detail = (f"you requested {prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, "
                  f"{completion_tokens} for the completion)")
    return APIError(400, f"This model's maximum context length is {limit} tokens, however {detail}. "
                         "Please reduce the length of the prompt or of the completion.",
                    param=param, code="context_length_exceeded")


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(503, "The server is at capacity; please retry shortly.", type="server_error",
                    code="server_overloaded", headers={"Retry-After": str(retry_after_s)})


def over_share(waiting: int, share: int, retry_after_s: int) -> APIError:
    """429 for a caller whose own completions already fill its share of the queue (serving.fair_share)."""
    return APIError(429, f"You have {waiting} completions waiting for this server; each caller may have at most "
                         f"{share} waiting at once. Please retry when some of them have started.",
                    type="requests", code="rate_limit_exceeded", headers={"Retry-After": str(retry_after_s)})


def _most_telling(errors: list[dict]) -> dict:
    """The first error about the first faulty field, preferring one that says more than "wrong type".

    For a field that may be a string or a list, pydantic reports one error per form; a list
    that is too long also fails as "not a string", which is the less useful of the two.
    """
    field = errors[0].get("loc", ())[:2]
    same_field = [e for e in errors if e.get("loc", ())[:2] == field]
    return next((e for e in same_field if not str(e.get("type", "")).endswith("_type")), errors[0])


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = _most_telling(errors)
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Pydantic names the union member it tried ("str", "list[int]") inside the path; the
    # client only cares about the field.
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "float", "bool"}
           and not p.startswith(("constrained-", "function-"))]
    if loc[:1] == ["logit_bias"]:
        loc = loc[:1]  # what follows is the client's own key, not a parameter
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if param is None:
        return f"Invalid request body: {message}.", None
    return f"Invalid value for '{param}': {message}.", param


def install_error_handlers(app: FastAPI) -> None:

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code,
                              headers={**_known_request_id(request), **(exc.headers or {})})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_error(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"Unknown request URL: {request.method} {request.url.path}.",
                                  code="unknown_url")
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed for {request.url.path}.",
                                  code="method_not_allowed")
        headers = {**_known_request_id(request), **(getattr(exc, "headers", None) or {})}
        if exc.status_code >= 500:
            request_id = request_id_of(request)
            log.error("request %s: %s %s answered %d: %s", request_id, request.method, request.url.path,
                      exc.status_code, exc.detail)
            return error_response(exc.status_code, f"{GENERIC_FAILURE_MESSAGE} Request id: {request_id}.",
                                  type="server_error", headers={**headers, REQUEST_ID_HEADER: request_id})
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        log.error("request %s: unexpected error on %s %s", request_id, request.method, request.url.path,
                  exc_info=exc)
        return server_error(request_id).response()
