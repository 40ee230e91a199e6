"""``GET /runs/{id}/events``: a run's events as Server-Sent Events.

The response replays the run's retained events after the resume point, then
streams live ones, and ends after the terminal event. Each event is the
frame :func:`trioflow.protocol.encode_event` makes (with the codec of
:mod:`trioflow.sse`, :meth:`FlowEvent.to_sse() <trioflow.FlowEvent.to_sse>`
but for the renamed events)::

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
    one write. A connection reads the run through its own subscription
    (bounded, :attr:`~trioflow.Overflow.EVICT`) until it has caught up, then
    through the run's shared fan-out (:mod:`trioflow.web._fanout`), where it
    is bounded by ``buffer`` events too: a client that cannot keep up never
    holds the run back nor makes the server's memory grow. A client that
    disconnects releases its subscription or its place in the fan-out at
    once. Under :func:`~trioflow.web.serve` (cleartext HTTP/1.1, no added
    middleware) the whole connection is served by trioflow itself
    (:mod:`trioflow.web._direct`) and the response says ``Connection:
    close``; anywhere else it is this module's :class:`EventStreamResponse`,
    an ordinary ASGI response.

Encoded once
    Every frame of a run is encoded once: the run's
    :class:`~trioflow.web._streams.FrameCache` of SSE frames (bounded like
    the run's history) holds the frames of its newest events, and a late
    joiner's replay is written from it, byte for byte the frames a live
    client got. The catch-up, the cache and the join to the fan-out are
    shared with the WebSockets (:mod:`trioflow.web._streams`); this module
    gives them the SSE encoding (:data:`SSE`) and the ``retry:`` field sent
    first.

One decision, two transports
    Whether a request gets a stream, and from where, is decided by one
    function, :func:`event_stream_answer` (``Host``, token and ``Origin``,
    the run, the resume point), for the Starlette route and for the
    connection served directly alike; the stream itself is :func:`stream_events`,
    writing to an :class:`EventOutput` (the ASGI ``send``, or the socket).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from starlette.datastructures import QueryParams
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from trioflow._util import collapse_single_group
from trioflow.events import FlowEvent
from trioflow.handle import RunHandle as Run
from trioflow.history import HistoryExpired
from trioflow.protocol import (
    ERROR_EVENT,
    EVICTED,
    HISTORY_EXPIRED,
    RENAMED_EVENTS,
    encode_error,
    encode_event,
    event_name,
)
from trioflow.sse import encode
from trioflow.web._runs import RunHub, resume_point
from trioflow.web._streams import Encoding, StreamOutput, stream_run

if TYPE_CHECKING:
    from trioflow.web._auth import AccessPolicy

__all__ = [
    "ERROR_EVENT",
    "EVENTS_PATH",
    "HEADERS",
    "KEEPALIVE",
    "RENAMED_EVENTS",
    "SSE",
    "SSE_FORMAT",
    "EventOutput",
    "EventStreamResponse",
    "StreamFormat",
    "encode_error",
    "encode_event",
    "event_name",
    "event_stream_answer",
    "stream_events",
]

KEEPALIVE = encode(comment="keepalive")
"""The comment sent after ``keepalive`` seconds of silence."""

EVENTS_PATH = re.compile(r"/runs/([^/]+)/events")
"""The event stream's path; the group is the run id (the Starlette route's ``{run_id}``)."""

HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)
"""The event stream's response headers (besides the server's framing)."""


def _encode_frame(event: FlowEvent) -> bytes:
    return encode_event(event).encode("ascii")


def _evicted_frame(last_seq: int) -> bytes:
    return encode_error(
        EVICTED,
        f"this client fell behind and was disconnected; reconnect with "
        f"Last-Event-ID: {last_seq} to resume",
        last_seq=last_seq,
    ).encode("ascii")


# -- encoded once -----------------------------------------------------------------------


SSE: Encoding[bytes, bytes] = Encoding(
    name="sse",
    event=_encode_frame,
    join=b"".join,
    evicted=lambda run_id, last_seq: _evicted_frame(last_seq),
    keepalive=KEEPALIVE.encode("ascii"),
)
"""The event stream's encoding: one SSE frame per event, a batch's frames in one write."""


# -- the decision -------------------------------------------------------------------------


def event_stream_answer(
    hub: RunHub, access: AccessPolicy | None, scope: Scope, run_id: str
) -> tuple[Run, int] | Response:
    """What ``GET /runs/{run_id}/events`` gets: the run and the resume point, or a response.

    The one decision for the Starlette route and for the connection served
    directly (:mod:`trioflow.web._direct`): the access rules (``Host``,
    token, ``Origin``; ``access`` ``None`` when they were applied already),
    the run, the resume point (``Last-Event-ID``, else ``?after=``), and
    ``204`` for a resume of a finished run with nothing left to send.

    Raises:
        ApiError: ``403``/``401`` (access), ``404`` ``run_not_found``, ``400``
            ``invalid_after``.
    """
    if access is not None:
        error = access.check(scope)
        if error is not None:
            raise error
    run = hub.get(run_id)
    raw: str | None = None
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            raw = value.decode("latin-1").strip() or None
            break
    if raw is None:
        query: bytes = scope.get("query_string", b"")
        if query:
            raw = QueryParams(query).get("after")
    after = 0 if raw is None else resume_point(raw, run)
    if run.done and after >= run.last_seq:
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    return run, after


# -- the stream, to either transport ------------------------------------------------------


class EventOutput(StreamOutput[bytes, bytes]):
    """Where one event stream writes: the ASGI ``send``, or the connection's socket.

    :attr:`sock` is the socket the fan-out may write to directly (``None``:
    never), :attr:`frame` how bytes are framed on it (an HTTP/1.1 chunk, or
    as they are). :meth:`write` and :meth:`end` raise
    :exc:`trio.BrokenResourceError` or :exc:`trio.ClosedResourceError` when
    the client has gone. :attr:`head` (the ``retry:`` field) goes out with
    the first write.
    """

    ending = False
    """Whether :meth:`end` has begun (a disconnect from then on is not the client's)."""
    head = b""
    """Bytes that go out in front of the first write."""

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send ``frames`` in one write (the :attr:`head` first, if not sent yet)."""
        data = b"".join([self.head, *frames])
        self.head = b""
        await self.write(data)

    async def send_pieces(self, pieces: list[bytes]) -> None:
        """Send the fan-out's chunks in one write."""
        await self.write_framed(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    async def finish(self, frames: list[bytes]) -> None:
        """Send ``frames`` (the :attr:`head` first, if not sent yet) and end the response."""
        data = b"".join([self.head, *frames])
        self.head = b""
        await self.end(data)

    def holds(self) -> bool:
        """Whether the :attr:`head` has not gone out yet."""
        return bool(self.head)

    async def flush(self) -> None:
        """Send the :attr:`head` (alone)."""
        await self.send_frames([])

    async def start(self) -> None:
        """Begin the ``200`` response with :data:`HEADERS`."""
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        """Send ``data`` (not framed yet)."""
        raise NotImplementedError

    async def write_framed(self, data: bytes) -> None:
        """Send ``data``, framed by :meth:`frame` already."""
        await self.write(data)

    async def end(self, data: bytes) -> None:
        """Send ``data`` and end the response (shielded from cancellation)."""
        raise NotImplementedError

    async def wait_disconnect(self) -> None:
        """Return when the client has gone."""
        raise NotImplementedError


async def stream_events(
    hub: RunHub, run: Run, after: int, out: EventOutput, fmt: StreamFormat | None = None
) -> None:
    """Stream ``run``'s events after ``after`` to ``out`` until the terminal event, an eviction, or the client leaving.

    ``fmt`` is the wire format (:data:`SSE_FORMAT` by default). The
    connection counts as one of the run's watchers meanwhile (and is
    tracked for the hub's drain).
    """
    watch = hub.attach(run)
    disconnected = False
    try:
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                with hub.connection(nursery.cancel_scope):  # the drain may cancel it

                    async def wait_disconnect() -> None:
                        nonlocal disconnected
                        await out.wait_disconnect()
                        # The end of a complete response may be reported as a
                        # disconnect: that one is not the client's.
                        if not out.ending:
                            disconnected = True
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(wait_disconnect)
                    await _respond(hub, run, after, out, fmt or SSE_FORMAT)
                    nursery.cancel_scope.cancel()
    finally:
        watch.release(disconnected=disconnected or out.broken)


@functools.lru_cache(maxsize=8)
def _retry_field(seconds: float) -> bytes:
    """The stream's first field, ``retry:`` in milliseconds (made once per value, not per connection)."""
    return encode(retry=max(1, math.ceil(seconds * 1000))).encode("ascii")


@dataclasses.dataclass(frozen=True, slots=True)
class StreamFormat:
    """A wire format of a run's event stream: its encoding, headers, first bytes and error frame."""

    encoding: Encoding[bytes, bytes]
    """How each event is framed (encoded once per run, shared by every connection)."""
    headers: tuple[tuple[bytes, bytes], ...]
    """The response's headers (``content-type`` among them)."""
    head: Callable[[RunHub], bytes]
    """The bytes sent first (SSE: the ``retry:`` field)."""
    error: Callable[[str, str, dict[str, Any]], bytes]
    """A stream error's frame (code, message, details)."""


def _sse_error(code: str, message: str, details: dict[str, Any]) -> bytes:
    return encode_error(code, message, **details).encode("ascii")


SSE_FORMAT = StreamFormat(SSE, HEADERS, lambda hub: _retry_field(hub.config.retry), _sse_error)
"""Server-Sent Events (:data:`SSE`, ``retry:`` first, errors as ``trioflow.error`` frames)."""


async def _respond(hub: RunHub, run: Run, after: int, out: EventOutput, fmt: StreamFormat) -> None:
    out.head = fmt.head(hub)
    try:
        await stream_run(hub, run, after, out, fmt.encoding)
    except HistoryExpired as exc:
        await out.start()
        details = {"requested": exc.requested, "first_available": exc.first_available}
        await out.finish([fmt.error(HISTORY_EXPIRED, str(exc), details)])


# -- the ASGI response -----------------------------------------------------------------


def _body(data: bytes, *, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


class _AsgiOutput(EventOutput):
    """The ASGI ``send`` (any server, and :func:`~trioflow.web.serve` with middleware or TLS)."""

    def __init__(
        self, send: Send, receive: Receive, headers: tuple[tuple[bytes, bytes], ...] = HEADERS
    ) -> None:
        self._send = send
        self._receive = receive
        self._headers = list(headers)

    async def start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": self._headers})

    async def write(self, data: bytes) -> None:
        await self._send(_body(data))

    async def end(self, data: bytes) -> None:
        # The last message must not be cancelled half-way: the server finishes
        # the exchange (and readies the connection for its next request) in it.
        self.ending = True
        with trio.CancelScope(shield=True):
            await self._send(_body(data, more=False))

    async def wait_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass


class EventStreamResponse(Response):
    """The ``text/event-stream`` response of one run, from ``after`` on, through the ASGI ``send``.

    The connection first reads the run through a subscription of its own
    (the replay from ``after``, then live events) until it has caught up;
    then it joins the run's :class:`~trioflow.web._fanout.EventFanout`, which
    encodes each event once for every connection (:func:`stream_events`).

    Args:
        hub: the server's :class:`~trioflow.web._runs.RunHub`.
        run: the run to stream.
        after: resume after this seq (``0``: from the first event).
    """

    media_type = "text/event-stream"

    def __init__(self, hub: RunHub, run: Run, after: int, fmt: StreamFormat | None = None) -> None:
        self.hub = hub
        self.run = run
        self.after = after
        self.fmt = fmt or SSE_FORMAT
        self.status_code = 200
        self.background = None
        self.raw_headers = list(self.fmt.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the terminal event, an eviction, or the client leaving."""
        output = _AsgiOutput(send, receive, self.fmt.headers)
        await stream_events(self.hub, self.run, self.after, output, self.fmt)
