"""``GET /runs/{id}/events.ndjson``: a run's events as newline-delimited JSON.

One event per line, exactly :meth:`FlowEvent.to_json()
<trioflow.FlowEvent.to_json>` (the ``data:`` of the event stream, with its
``"id"``, the seq), ``Content-Type: application/x-ndjson``: for ``curl``,
``jq`` and log pipelines. The same run, the same decision and the same flow
control as the event stream (:mod:`trioflow.web._sse`: access rules, the
resume point from ``Last-Event-ID`` or ``?after=``, ``204`` for a finished
run with nothing left, one frame encoded once per run and shared by every
connection, a bounded buffer per connection); only the framing differs:

* the response ends after the terminal event's line;
* a stream error is a line without ``"id"``:
  ``{"error": {"code": "evicted" | "history_expired", "message": ..., ...}}``
  (``last_seq`` of an eviction: resume with ``?after=<last_seq>``);
* after :attr:`~trioflow.web.WebConfig.keepalive` seconds of silence an
  empty line is sent (readers of NDJSON skip blank lines), so proxies keep
  the connection.

It is served through the application (any ASGI server, and
:func:`~trioflow.web.serve`), not on the connection itself as the event
stream is.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import Response

from trioflow.events import FlowEvent
from trioflow.protocol import EVICTED
from trioflow.web._sse import EventStreamResponse, StreamFormat, event_stream_answer
from trioflow.web._streams import Encoding

if TYPE_CHECKING:
    from trioflow.web._runs import RunHub

__all__ = ["NDJSON", "NDJSON_FORMAT", "run_ndjson"]

_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"application/x-ndjson"),
)


def _line(event: FlowEvent) -> bytes:
    return event.to_json().encode() + b"\n"


def _error(code: str, message: str, details: dict[str, Any]) -> bytes:
    body = {"error": {"code": code, "message": message, **details}}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _evicted(run_id: str, last_seq: int) -> bytes:
    return _error(
        EVICTED,
        f"this client fell behind and was disconnected; resume with ?after={last_seq}",
        {"last_seq": last_seq},
    )


NDJSON: Encoding[bytes, bytes] = Encoding(
    name="ndjson",
    event=_line,
    join=b"".join,
    evicted=_evicted,
    keepalive=b"\n",
)
"""One JSON line per event (the run's cache and fan-out of these lines are its own)."""

NDJSON_FORMAT = StreamFormat(NDJSON, _HEADERS, lambda hub: b"", _error)
"""Newline-delimited JSON: nothing first, errors as ``{"error": {...}}`` lines."""


async def run_ndjson(request: Request) -> Response:
    """``GET /runs/{run_id}/events.ndjson``: the run's events as NDJSON (see the module documentation)."""
    hub = cast("RunHub", request.app.state.trioflow)
    # The access rules were applied by the middleware (AccessControl).
    answer = event_stream_answer(hub, None, request.scope, request.path_params["run_id"])
    if isinstance(answer, Response):
        return answer
    return EventStreamResponse(hub, *answer, fmt=NDJSON_FORMAT)
