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
    Every frame of a run is encoded once: the run's :class:`FrameCache`
    (bounded like the run's history) holds the frames of its newest events,
    and a late joiner's replay is written from it, byte for byte the frames
    a live client got.

One decision, two transports
    Whether a request gets a stream, and from where, is decided by one
    function, :func:`event_stream_answer` (``Host``, token and ``Origin``,
    the run, the resume point), for the Starlette route and for the
    connection served directly alike; the stream itself is :func:`stream_events`,
    writing to an :class:`EventOutput` (the ASGI ``send``, or the socket).
"""

from __future__ import annotations

import collections
import math
import re
import weakref
from typing import TYPE_CHECKING

import trio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from trioflow._util import collapse_single_group
from trioflow.bus import Overflow, SubscriberEvicted, Subscription
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
from trioflow.web._config import WebConfig
from trioflow.web._fanout import EventFanout, FanoutTarget
from trioflow.web._runs import RunHub, resume_point

if TYPE_CHECKING:
    from trioflow.web._auth import AccessPolicy

__all__ = [
    "ERROR_EVENT",
    "EVENTS_PATH",
    "HEADERS",
    "KEEPALIVE",
    "RENAMED_EVENTS",
    "EventOutput",
    "EventStreamResponse",
    "FrameCache",
    "encode_error",
    "encode_event",
    "event_name",
    "event_stream_answer",
    "frame_cache",
    "new_fanout",
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


class FrameCache:
    """The SSE frames of a run's newest events, each encoded once.

    In step with the run's history: it holds at most ``capacity`` frames
    (the history's bound), of consecutive seqs. It is only ever asked for
    the frames of events in hand (read from the run's history or live by a
    subscription), so it never serves a frame the history no longer holds:
    a resume from too far back fails with :exc:`~trioflow.history.HistoryExpired`
    in the subscription, exactly as without the cache.

    Args:
        capacity: the most frames kept (``0``: none, every frame is encoded).
    """

    __slots__ = ("_first", "_frames", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._frames: collections.deque[bytes] = collections.deque(maxlen=capacity)
        self._first = 1  # the seq of _frames[0]

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def first_seq(self) -> int:
        """The seq of the oldest frame held (``last_seq + 1`` when none is)."""
        return self._first

    def get(self, seq: int) -> bytes | None:
        """The frame of event ``seq``, or ``None`` if it is not held."""
        index = seq - self._first
        if 0 <= index < len(self._frames):
            return self._frames[index]
        return None

    def frames(self, events: list[FlowEvent]) -> list[bytes]:
        """The frames of ``events`` (consecutive seqs): held ones as they are, the others encoded and kept."""
        frames = self._frames
        out: list[bytes] = []
        for event in events:
            seq = event.seq
            index = seq - self._first
            if 0 <= index < len(frames):
                out.append(frames[index])
                continue
            frame = _encode_frame(event)
            out.append(frame)
            if not self.capacity:
                continue
            if index == len(frames):  # the next one: keep it (the oldest may fall out)
                if len(frames) == self.capacity:
                    self._first += 1
                frames.append(frame)
            elif index > len(frames):  # a gap (the run went on unwatched): start again here
                frames.clear()
                frames.append(frame)
                self._first = seq
            # an event older than the oldest held: encoded, not kept
        return out


_caches: weakref.WeakKeyDictionary[Run, FrameCache] = weakref.WeakKeyDictionary()


def frame_cache(run: Run, hub: RunHub) -> FrameCache:
    """The run's :class:`FrameCache` (made on first use, bounded like the run's history).

    It lives as long as the run object does.
    """
    cache = _caches.get(run)
    if cache is None:
        capacity = hub.executor.history
        try:
            capacity = run.bus.history.capacity  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            pass
        cache = _caches[run] = FrameCache(capacity)
    return cache


def new_fanout(run: Run, config: WebConfig, cache: FrameCache | None = None) -> EventFanout:
    """The :class:`~trioflow.web._fanout.EventFanout` writing ``run``'s SSE frames (from ``cache``)."""
    return EventFanout(
        run,
        encode=(cache or FrameCache(0)).frames,
        evicted=_evicted_frame,
        keepalive=config.keepalive,
        keepalive_frame=KEEPALIVE.encode("ascii"),
        buffer=max(4096, config.buffer),
    )


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
            from starlette.datastructures import QueryParams

            raw = QueryParams(query).get("after")
    after = 0 if raw is None else resume_point(raw, run)
    if run.done and after >= run.last_seq:
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    return run, after


# -- the stream, to either transport ------------------------------------------------------


class EventOutput:
    """Where one event stream writes: the ASGI ``send``, or the connection's socket.

    :attr:`sock` is the socket the fan-out may write to directly (``None``:
    never), :attr:`frame` how bytes are framed on it (an HTTP/1.1 chunk, or
    as they are). :meth:`write` and :meth:`end` raise
    :exc:`trio.BrokenResourceError` or :exc:`trio.ClosedResourceError` when
    the client has gone.
    """

    sock: trio.socket.SocketType | None = None
    ending = False
    """Whether :meth:`end` has begun (a disconnect from then on is not the client's)."""
    broken = False
    """Whether the client went away mid-stream."""

    @staticmethod
    def frame(data: bytes) -> bytes:
        """``data`` as this output frames it (as it is, for ASGI)."""
        return data

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


async def stream_events(hub: RunHub, run: Run, after: int, out: EventOutput) -> None:
    """Stream ``run``'s events after ``after`` to ``out`` until the terminal event, an eviction, or the client leaving.

    The connection counts as one of the run's watchers meanwhile (and is
    tracked for the hub's drain).
    """
    watch = hub.attach(run)
    disconnected = False
    try:
        with hub.connection(), collapse_single_group():
            async with trio.open_nursery() as nursery:

                async def wait_disconnect() -> None:
                    nonlocal disconnected
                    await out.wait_disconnect()
                    # The end of a complete response may be reported as a
                    # disconnect: that one is not the client's.
                    if not out.ending:
                        disconnected = True
                        nursery.cancel_scope.cancel()

                nursery.start_soon(wait_disconnect)
                await _respond(hub, run, after, out)
                nursery.cancel_scope.cancel()
    finally:
        watch.release(disconnected=disconnected or out.broken)


async def _respond(hub: RunHub, run: Run, after: int, out: EventOutput) -> None:
    config = hub.config
    head = encode(retry=max(1, math.ceil(config.retry * 1000))).encode("ascii")
    cache = frame_cache(run, hub)
    try:
        async with run.subscribe(
            after=after,
            buffer=config.buffer,
            overflow=Overflow.EVICT,
            name=f"sse {run.run_id}",
        ) as sub:
            await out.start()
            claims: list[EventFanout] = []
            try:
                joined = await _catch_up(hub, run, after, sub, out, claims, head, cache)
            finally:
                for fanout in claims:
                    fanout.release()
    except HistoryExpired as exc:
        await out.start()
        error = encode_error(
            HISTORY_EXPIRED,
            str(exc),
            requested=exc.requested,
            first_available=exc.first_available,
        )
        await out.end(head + error.encode("ascii"))
        return
    if joined is not None:
        await _follow(*joined, out)


async def _catch_up(
    hub: RunHub,
    run: Run,
    after: int,
    sub: Subscription,
    out: EventOutput,
    claims: list[EventFanout],
    head: bytes,
    cache: FrameCache,
) -> tuple[EventFanout, FanoutTarget] | None:
    """Stream from the connection's own subscription until it can join the fan-out.

    Returns the fan-out and the joined target, or None when the stream
    has ended here (terminal event, end of the run's events, eviction).
    Every fan-out it claimed is added to ``claims`` (for the caller to
    release). ``head`` (the ``retry:`` field) goes out with the first write.
    The replay's frames come from ``cache`` (encoded once per run).
    """
    config = hub.config
    sent_through = after
    fanout: EventFanout | None = None
    solo = False  # no fan-out to be had (no nursery for it): stream alone to the end

    def fanout_for(run: Run, config: WebConfig) -> EventFanout:
        return new_fanout(run, config, cache)

    while True:
        # One look at the subscription per turn: every await below may let
        # events in, so each one is followed by a new turn.
        if not solo and sub.statistics().size == 0:
            if fanout is None or not fanout.open:
                fanout = await hub.fanout(run, fanout_for)
                solo = fanout is None
                if fanout is not None:
                    claims.append(fanout)
                continue
            if fanout.ready and fanout.position <= sent_through:
                if head:
                    await out.write(head)
                    head = b""
                    continue
                target = FanoutTarget(
                    skip_through=sent_through,
                    limit=config.buffer,
                    sock=out.sock,
                    encode=out.frame,
                )
                fanout.add(target)
                return fanout, target
        batch: list[FlowEvent] | None = None
        ended = False
        evicted: SubscriberEvicted | None = None
        with trio.move_on_after(config.keepalive):
            try:
                batch = await sub.receive_batch()
            except trio.EndOfChannel:
                ended = True
            except SubscriberEvicted as exc:
                evicted = exc
        if evicted is not None:
            await out.end(head + _evicted_frame(evicted.last_seq))
            return None
        if ended:
            await out.end(head)
            return None
        if batch is None:
            await out.write(head + _KEEPALIVE)
            head = b""
            continue
        data = b"".join([head, *cache.frames(batch)])
        head = b""
        sent_through = batch[-1].seq
        if batch[-1].is_terminal():
            await out.end(data)
            return None
        await out.write(data)


_KEEPALIVE = KEEPALIVE.encode("ascii")


async def _follow(fanout: EventFanout, target: FanoutTarget, out: EventOutput) -> None:
    """Send what the fan-out leaves to this connection until the stream is over."""
    try:
        while True:
            data = target.take()
            if data:
                await out.write_framed(data)
                continue
            if target.finished:
                break
            target.go_direct()  # all sent: the fan-out may write itself again
            await target.wait()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        target.broken = True
    finally:
        fanout.discard(target)
    if target.broken:
        out.broken = True
        return
    try:
        await out.end(b"")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        out.broken = True


# -- the ASGI response -----------------------------------------------------------------


def _body(data: bytes, *, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


class _AsgiOutput(EventOutput):
    """The ASGI ``send`` (any server, and :func:`~trioflow.web.serve` with middleware or TLS)."""

    def __init__(self, send: Send, receive: Receive) -> None:
        self._send = send
        self._receive = receive

    async def start(self) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": list(HEADERS)})

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

    def __init__(self, hub: RunHub, run: Run, after: int) -> None:
        self.hub = hub
        self.run = run
        self.after = after
        self.status_code = 200
        self.background = None
        self.raw_headers = list(HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the terminal event, an eviction, or the client leaving."""
        await stream_events(self.hub, self.run, self.after, _AsgiOutput(send, receive))
