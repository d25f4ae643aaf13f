"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

FastAPI's own answers (a 422 with a `detail` list, a 404 `{"detail": "Not Found"}`) would
break clients that parse OpenAI's body, so every handler here returns the OpenAI shape, and
anything unexpected becomes a 500 in that shape rather than a bare traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("serving")


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
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; GET /v1/models lists the models served here.",
                    param="model", code="model_not_found")


def context_length_exceeded(limit: int, prompt_tokens: int, completion_tokens: int | None) -> APIError:
    if completion_tokens is None:
        detail = f"your prompt has {prompt_tokens} tokens, which leaves no room for a completion"
    else:
        detail = (f"you requested {prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, "
                  f"{completion_tokens} for the completion)")
    return APIError(400, f"This model's maximum context length is {limit} tokens, however {detail}. "
                         "Please reduce the length of the prompt or of the completion.",
                    param="messages", code="context_length_exceeded")


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(503, "The server is at capacity; please retry shortly.", type="server_error",
                    code="server_overloaded", headers={"Retry-After": str(retry_after_s)})


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Pydantic names the union member it tried ("str", "list[int]") inside the path; the
    # client only cares about the field.
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in {"str", "int", "float", "bool"}
           and not p.startswith(("constrained-", "function-"))]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if param is None:
        return f"Invalid request body: {message}.", None
    return f"Invalid value for '{param}': {message}.", param


def install_error_handlers(app: FastAPI) -> None:

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

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
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "The server had an error while processing your request.", type="server_error")
