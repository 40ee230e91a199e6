"""API errors: one JSON shape, ``{"error": {"code": "...", "message": "..."}}``, for every failure.

Endpoints raise :exc:`ApiError`; the handlers here turn it, Starlette's own
``404``/``405`` and any unexpected exception (``500``) into that shape, so a
client never has to parse HTML or plain text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ExceptionHandler

__all__ = ["EXCEPTION_HANDLERS", "ApiError", "error_response"]

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """A failure to report to the client as ``{"error": {"code", "message", ...}}``.

    Args:
        status: the HTTP status (4xx or 5xx).
        code: a stable, machine-readable code (``"not_found"``, ``"invalid_request"``, ...).
        message: a sentence for humans saying what went wrong and what to do.
        headers: extra response headers (``WWW-Authenticate``, ``Allow``, ...).
        **details: more JSON-compatible members of the ``error`` object.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        /,
        *,
        headers: Mapping[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The body: ``{"error": {"code", "message", ...details}}``."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}

    def response(self) -> JSONResponse:
        """This error as a JSON response with its status and headers."""
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """A JSON error response: ``{"error": {"code": code, "message": message}}`` with ``status``."""
    return ApiError(status, code, message, headers=headers).response()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    code = _CODES.get(status, "error")
    if status == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    return error_response(status, code, message, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises ``exc`` after this response, so the server logs it.
    return error_response(500, "internal_error", "the server failed to handle this request")


EXCEPTION_HANDLERS: Mapping[Any, ExceptionHandler] = {
    ApiError: _api_error,
    HTTPException: _http_exception,
    Exception: _internal_error,
}
"""Starlette exception handlers mapping every failure to the JSON error shape."""
