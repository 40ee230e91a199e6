"""``GET /runs/{id}/events``: a run's events as Server-Sent Events.

The response replays the run's retained events after the resume point, then
streams live ones, and ends after the terminal event. Each event is the
frame :meth:`FlowEvent.to_sse() <trioflow.FlowEvent.to_sse>` makes::

    id: 7
    event: token.received
    data: {"id":7,"run_id":"run_0001_...","type":"token.received","data":{"token":" me"},...}

Event names
    The ``event:`` field is the event's type, with one exception. A browser's
    ``EventSource`` fires ``error`` (and ``open``) for its *connection*, so
    an event of type ``error`` is named ``run.error`` (and one of type
    ``open`` is named ``run.open``); its ``data`` still says ``"type":
    "error"``. Errors of the stream itself are named ``trioflow.error`` and
    have no ``id:``; their data is ``{"code": ..., "message": ...}``:

    * ``evicted``: the client fell behind by more than the connection's
      buffer; ``last_seq`` is the last event it was sent. The stream ends;
      reconnecting with ``Last-Event-ID: <last_seq>`` (what a browser does by
      itself) resumes with no gap.
    * ``history_expired``: the resume point is older than the run's
      retained history (``first_available`` is the oldest seq still there).
      Resuming cannot be gapless: start over without ``Last-Event-ID``.

    The ``trioflow.`` prefix is reserved for the server: do not use it for
    custom event types.

Resuming
    ``Last-Event-ID: <seq>`` (or ``?after=<seq>``; the header wins) resumes
    after that event: no gap, no duplicate. ``204 No Content`` answers a
    resume of a finished run with nothing left to send, which tells a browser
    to stop reconnecting.

Framing and flow
    ``retry:`` is sent once, first; a ``: keepalive`` comment after every
    ``keepalive`` seconds of silence. Every event ready at once goes out in
    one write. Each connection reads the run through its own subscription
    with a bounded buffer and :attr:`~trioflow.Overflow.EVICT`: a client
    that cannot keep up never holds the run back nor makes the server's
    memory grow. A client that disconnects releases its subscription at once.
"""

from __future__ import annotations

import json
import math
from typing import Any

import trio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from trioflow._util import collapse_single_group
from trioflow.bus import Overflow, SubscriberEvicted, Subscription
from trioflow.events import FlowEvent
from trioflow.executor import Run
from trioflow.history import HistoryExpired
from trioflow.web.runs import RunHub

__all__ = [
    "ERROR_EVENT",
    "KEEPALIVE",
    "RENAMED_EVENTS",
    "EventStreamResponse",
    "encode_error",
    "encode_event",
    "event_name",
]

ERROR_EVENT = "trioflow.error"
"""The SSE event name of errors of the stream itself (not of the run)."""

RENAMED_EVENTS: dict[str, str] = {"error": "run.error", "open": "run.open"}
"""Event types sent under another SSE name, because ``EventSource`` uses their names itself."""

KEEPALIVE = ": keepalive\n\n"
"""The comment sent after ``keepalive`` seconds of silence."""

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def event_name(type: str) -> str:
    """The SSE ``event:`` name of events of ``type`` (``type`` itself, except :data:`RENAMED_EVENTS`)."""
    return RENAMED_EVENTS.get(type, type)


def encode_event(event: FlowEvent) -> str:
    """``event`` as one SSE frame: :meth:`FlowEvent.to_sse`, under :func:`event_name`."""
    name = RENAMED_EVENTS.get(event.type)
    if name is None:
        return event.to_sse()
    return f"id: {event.seq}\nevent: {name}\ndata: {event.to_json()}\n\n"


def encode_error(code: str, message: str, **details: Any) -> str:
    """A :data:`ERROR_EVENT` frame with ``{"code", "message", **details}`` (no ``id:``)."""
    payload = _dumps({"code": code, "message": message, **details})
    return f"event: {ERROR_EVENT}\ndata: {payload}\n\n"


def _body(text: str, *, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": text.encode("ascii"), "more_body": more}


class EventStreamResponse(Response):
    """The ``text/event-stream`` response of one run, from ``after`` on.

    Args:
        hub: the server's :class:`~trioflow.web.runs.RunHub`.
        run: the run to stream.
        after: resume after this seq (``0``: from the first event).
    """

    media_type = "text/event-stream"

    def __init__(self, hub: RunHub, run: Run, after: int) -> None:
        self.hub = hub
        self.run = run
        self.after = after
        self.status_code = 200
        self.background = None
        self._ending = False
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the terminal event, an eviction, or the client leaving."""
        config = self.hub.config
        watch = self.hub.attach(self.run)
        disconnected = False
        try:
            with self.hub.connection(), collapse_single_group():
                async with trio.open_nursery() as nursery:

                    async def wait_disconnect() -> None:
                        nonlocal disconnected
                        while (await receive())["type"] != "http.disconnect":
                            pass
                        # The server also reports the end of a complete
                        # response as a disconnect: that one is not the client's.
                        if not self._ending:
                            disconnected = True
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(wait_disconnect)
                    await self._respond(send, config.buffer, config.keepalive, config.retry)
                    nursery.cancel_scope.cancel()
        finally:
            watch.release(disconnected=disconnected)

    async def _respond(self, send: Send, buffer: int, keepalive: float, retry: float) -> None:
        head = f"retry: {max(1, math.ceil(retry * 1000))}\n\n"
        try:
            async with self.run.subscribe(
                after=self.after,
                buffer=buffer,
                overflow=Overflow.EVICT,
                name=f"sse {self.run.run_id}",
            ) as sub:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                await send(_body(head))
                await self._pump(sub, send, keepalive)
        except HistoryExpired as exc:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            error = encode_error(
                "history_expired",
                str(exc),
                requested=exc.requested,
                first_available=exc.first_available,
            )
            await self._end(send, head + error)

    async def _pump(self, sub: Subscription, send: Send, keepalive: float) -> None:
        while True:
            batch: list[FlowEvent] | None = None
            ended = False
            evicted: SubscriberEvicted | None = None
            with trio.move_on_after(keepalive):
                try:
                    batch = await sub.receive_batch()
                except trio.EndOfChannel:
                    ended = True
                except SubscriberEvicted as exc:
                    evicted = exc
            if evicted is not None:
                error = encode_error(
                    "evicted",
                    f"this client fell behind and was disconnected; reconnect with "
                    f"Last-Event-ID: {evicted.last_seq} to resume",
                    last_seq=evicted.last_seq,
                )
                await self._end(send, error)
                return
            if ended:
                await self._end(send, "")
                return
            if batch is None:
                await send(_body(KEEPALIVE))
                continue
            frames = "".join([encode_event(e) for e in batch])
            if batch[-1].is_terminal():
                await self._end(send, frames)
                return
            await send(_body(frames))

    async def _end(self, send: Send, text: str) -> None:
        # The last message must not be cancelled half-way: the server finishes
        # the exchange (and readies the connection for its next request) in it.
        self._ending = True
        with trio.CancelScope(shield=True):
            await send(_body(text, more=False))
