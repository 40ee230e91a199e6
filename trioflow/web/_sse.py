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
    once. Under :func:`~trioflow.web.serve` the response says
    ``Connection: close``: its last chunk is written directly, and the
    server closes the connection after it.
"""

from __future__ import annotations

import math

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
from trioflow.web._connections import GuardedStream
from trioflow.web._fanout import EventFanout, FanoutTarget, chunk, connection_socket, duplicate
from trioflow.web._runs import RunHub

__all__ = [
    "ERROR_EVENT",
    "KEEPALIVE",
    "RENAMED_EVENTS",
    "EventStreamResponse",
    "encode_error",
    "encode_event",
    "event_name",
    "new_fanout",
]

KEEPALIVE = encode(comment="keepalive")
"""The comment sent after ``keepalive`` seconds of silence."""


def _body(text: str | bytes, *, more: bool = True) -> Message:
    body = text.encode("ascii") if isinstance(text, str) else text
    return {"type": "http.response.body", "body": body, "more_body": more}


def _as_is(data: bytes) -> bytes:
    return data


def _encode_frame(event: FlowEvent) -> bytes:
    return encode_event(event).encode("ascii")


def _evicted_frame(last_seq: int) -> bytes:
    return encode_error(
        EVICTED,
        f"this client fell behind and was disconnected; reconnect with "
        f"Last-Event-ID: {last_seq} to resume",
        last_seq=last_seq,
    ).encode("ascii")


def new_fanout(run: Run, config: WebConfig) -> EventFanout:
    """The :class:`~trioflow.web._fanout.EventFanout` writing ``run``'s SSE frames."""
    return EventFanout(
        run,
        encode=_encode_frame,
        evicted=_evicted_frame,
        keepalive=config.keepalive,
        keepalive_frame=KEEPALIVE.encode("ascii"),
        buffer=max(4096, config.buffer),
    )


class EventStreamResponse(Response):
    """The ``text/event-stream`` response of one run, from ``after`` on.

    The connection first reads the run through a subscription of its own
    (the replay from ``after``, then live events) until it has caught up;
    then it joins the run's :class:`~trioflow.web._fanout.EventFanout`, which
    encodes each event once for every connection and, under
    :func:`~trioflow.web.serve`, writes it straight to the socket.

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
        self._ending = False
        self._broken = False
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the terminal event, an eviction, or the client leaving."""
        # The connection's socket, where the chunks can be written directly:
        # only for a cleartext HTTP/1.1 GET, whose body the server sends
        # chunked (never over TLS, nor HTTP/2: those go through ``send``).
        stream = None
        if (
            scope.get("http_version") == "1.1"
            and scope.get("method") == "GET"
            and scope.get("scheme") == "http"
        ):
            stream = connection_socket.get()
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
                    await self._respond(send, stream)
                    nursery.cancel_scope.cancel()
        finally:
            watch.release(disconnected=disconnected or self._broken)

    async def _respond(self, send: Send, stream: GuardedStream | None) -> None:
        config = self.hub.config
        head = encode(retry=max(1, math.ceil(config.retry * 1000)))
        try:
            async with self.run.subscribe(
                after=self.after,
                buffer=config.buffer,
                overflow=Overflow.EVICT,
                name=f"sse {self.run.run_id}",
            ) as sub:
                headers = self.raw_headers
                if stream is not None:
                    # The stream may end with the chunk terminator written
                    # directly, after which the server closes the connection.
                    headers = [*headers, (b"connection", b"close")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                claims: list[EventFanout] = []
                try:
                    joined = await self._catch_up(sub, send, stream, claims, head)
                finally:
                    for fanout in claims:
                        fanout.release()
        except HistoryExpired as exc:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            error = encode_error(
                HISTORY_EXPIRED,
                str(exc),
                requested=exc.requested,
                first_available=exc.first_available,
            )
            await self._end(send, head + error)
            return
        if joined is not None:
            await self._follow(*joined, send, stream)

    async def _catch_up(
        self,
        sub: Subscription,
        send: Send,
        stream: GuardedStream | None,
        claims: list[EventFanout],
        head: str,
    ) -> tuple[EventFanout, FanoutTarget] | None:
        """Stream from the connection's own subscription until it can join the fan-out.

        Returns the fan-out and the joined target, or None when the stream
        has ended here (terminal event, end of the run's events, eviction).
        Every fan-out it claimed is added to ``claims`` (for the caller to
        release). ``head`` (the ``retry:`` field) goes out with the first write.
        """
        config = self.hub.config
        sent_through = self.after
        fanout: EventFanout | None = None
        solo = False  # no fan-out to be had (no nursery for it): stream alone to the end
        while True:
            if not solo and sub.statistics().size == 0:
                if fanout is None or not fanout.open:
                    fanout = await self.hub.fanout(self.run, new_fanout)
                    solo = fanout is None
                    if fanout is not None:
                        claims.append(fanout)
                if (
                    fanout is not None
                    and fanout.ready
                    and fanout.open
                    and fanout.position <= sent_through
                    and sub.statistics().size == 0
                ):
                    if head:
                        await send(_body(head))
                        head = ""
                        continue  # events may have come meanwhile: look again
                    target = FanoutTarget(
                        skip_through=sent_through,
                        limit=config.buffer,
                        sock=None if stream is None else duplicate(stream),
                        encode=_as_is if stream is None else chunk,
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
                await self._end(send, head + _evicted_frame(evicted.last_seq).decode("ascii"))
                return None
            if ended:
                await self._end(send, head)
                return None
            if batch is None:
                await send(_body(head + KEEPALIVE))
                head = ""
                continue
            frames = "".join([head, *[encode_event(e) for e in batch]])
            head = ""
            sent_through = batch[-1].seq
            if batch[-1].is_terminal():
                await self._end(send, frames)
                return None
            await send(_body(frames))

    async def _follow(
        self,
        fanout: EventFanout,
        target: FanoutTarget,
        send: Send,
        stream: GuardedStream | None,
    ) -> None:
        """Send what the fan-out leaves to this connection until the stream is over."""
        try:
            while True:
                data = target.take()
                if data:
                    if stream is None:
                        await send(_body(data))
                    else:
                        await stream.send_all(data)
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
            self._broken = True
            return
        if stream is None:
            await self._end(send, "")
            return
        # The last chunk, written here rather than through the server (which
        # then closes the connection, as the response head announced): the
        # end of a run ends many streams at once, and this is the cheap way.
        self._ending = True
        with trio.CancelScope(shield=True):
            try:
                await stream.send_all(b"0\r\n\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True

    async def _end(self, send: Send, text: str | bytes) -> None:
        # The last message must not be cancelled half-way: the server finishes
        # the exchange (and readies the connection for its next request) in it.
        self._ending = True
        with trio.CancelScope(shield=True):
            await send(_body(text, more=False))
