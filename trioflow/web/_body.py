"""Reading a request's JSON body within its limits: :func:`read_json`.

The one reading of a JSON body for every endpoint that takes one
(``POST /runs``, threads, approvals, ``POST /agui``, ``POST /vercel/chat``):
its media type, its size (``Content-Length`` first, then while reading),
the time each part may take, and the decoding of :func:`trioflow._json.loads`.
"""

from __future__ import annotations

import logging
import math
from contextlib import aclosing

import trio
from starlette.requests import ClientDisconnect, Request

from trioflow._json import InvalidJSON, loads
from trioflow.web._errors import ApiError

__all__ = ["read_json"]

_JSON_TYPES = ("application/json",)

_log = logging.getLogger("trioflow.web")


async def read_json(request: Request, limit: int, *, body_timeout: float = math.inf) -> object:
    r"""Read and decode a JSON request body of at most ``limit`` bytes.

    Decodes with :func:`trioflow._json.loads`: nesting is bounded (a deep
    body is ``invalid_json``, never a ``RecursionError``), ``NaN`` and
    ``Infinity`` are refused. Strings may hold lone surrogates (``"\ud800"``):
    the caller validates the strings it keeps and names the member at fault
    (:meth:`RunRequest.parse <trioflow.web.RunRequest.parse>`).

    ``body_timeout`` bounds the wait for each part of the body (the body-read
    timeout): a client that stops sending mid-body is answered ``408``.

    Raises:
        ApiError: ``415`` unless the body is ``application/json``; ``413``
            when it is larger than ``limit`` (checked against
            ``Content-Length`` first, then while reading); ``400``
            (``invalid_json``) when it is empty, not valid UTF-8 JSON, or
            nested too deep; ``408`` when a part of the body took longer
            than ``body_timeout``; ``400`` ``client_disconnected`` (logged in
            one line, no traceback) when the client left mid-body.
    """
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in _JSON_TYPES and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as JSON with 'Content-Type: application/json' (got {media or 'none'!r})",
        )
    too_large = ApiError(
        413, "payload_too_large", f"the request body may have at most {limit} bytes"
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async with aclosing(request.stream()) as chunks:
        while True:
            with trio.move_on_after(body_timeout) as waiting:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except ClientDisconnect:
                    _log.info(
                        "%s %s: the client left before sending its whole body",
                        request.method,
                        request.url.path,
                    )
                    raise ApiError(400, "client_disconnected", "the client left mid-body") from None
            if waiting.cancelled_caught:
                raise ApiError(
                    408,
                    "request_timeout",
                    f"the request body stopped arriving for {body_timeout:g} s; send it whole",
                    headers={"Connection": "close"},
                )
            body += chunk
            if len(body) > limit:
                raise too_large
    if not body.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return loads(bytes(body), unicode=False)
    except InvalidJSON as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
