"""Bearer API keys, compared in constant time against every configured key."""

from __future__ import annotations

import hmac

from fastapi import Request

from serving.errors import APIError


class APIKeyCheck:
    """A FastAPI dependency; with no keys configured every request passes (loopback only)."""

    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(k.encode("utf-8") for k in keys)

    def __call__(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        given = token.encode("utf-8")
        # Every key is compared, match or not, so the time taken says nothing about which
        # key (or how much of one) was right.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, given)
        if not matched:
            raise _unauthorized("Incorrect API key provided.", code="invalid_api_key")


def _unauthorized(message: str, code: str | None = None) -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
