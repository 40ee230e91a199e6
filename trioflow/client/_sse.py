"""Following a run's Server-Sent Events stream: :func:`sse_events`.

:func:`sse_events` reads ``GET /runs/{id}/events`` with :mod:`httpx`, decodes
each frame into a :class:`~trioflow.FlowEvent`, and survives dropped
connections: it reconnects after a backoff with ``Last-Event-ID`` set to the
last seq it received, skips anything it has seen already, and stops after the
run's terminal event. The consumer sees every event of the run exactly once
and in order, however often the connection drops::

    async with sse_events("http://127.0.0.1:8000/runs/run_0001_ab12cd34/events") as events:
        async for event in events:
            print(event.seq, event.type, dict(event.data))

:class:`SSEDecoder` (from :mod:`trioflow.sse`, the codec the server uses too)
is the incremental, spec-following frame parser underneath.
"""

from __future__ import annotations

import collections
import contextlib
import json
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Final, Self

import httpx
import trio

from trioflow.client._errors import StreamError
from trioflow.events import FlowEvent
from trioflow.protocol import ERROR_EVENT, RESUMABLE_CODES
from trioflow.sse import ServerSentEvent, SSEDecoder
from trioflow.supervise import RetryPolicy

__all__ = [
    "DEFAULT_RETRY",
    "ERROR_EVENT",
    "SSEDecoder",
    "SSEEventStream",
    "ServerSentEvent",
    "sse_events",
]

DEFAULT_RETRY: Final = RetryPolicy(attempts=8, base_delay=0.25, max_delay=10.0)
"""The reconnect backoff of :func:`sse_events`: up to 8 connection attempts in a
row without a new event, 0.25 s, 0.5 s, 1 s, ... apart (at most 10 s)."""


# -- the stream -----------------------------------------------------------------


class _Dropped(Exception):
    """The connection ended before the run's terminal event."""


def _split_after(url: str) -> tuple[str, int | None]:
    """Take an ``after=`` query parameter off ``url``: the stream resumes by header instead."""
    parts = urllib.parse.urlsplit(url)
    if "after" not in urllib.parse.parse_qs(parts.query):
        return url, None
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    after: int | None = None
    kept = []
    for name, value in query:
        if name == "after":
            try:
                after = int(value)
            except ValueError:
                after = -1
            if after < 0:
                raise ValueError(f"the URL's 'after' must be an integer >= 0, not {value!r}")
        else:
            kept.append((name, value))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept))), after


class SSEEventStream:
    """The events of one run's SSE stream, across reconnects; made by :func:`sse_events`.

    An async context manager and an async iterator of
    :class:`~trioflow.FlowEvent`: inside ``async with``, ``async for`` yields
    each event of the run once, in seq order, and stops after the terminal
    event. :meth:`receive` is the channel-style equivalent.
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None,
        resume: bool,
        after: int | None,
        headers: Mapping[str, str],
        retry: RetryPolicy,
        http_timeout: httpx.Timeout,
    ) -> None:
        self.url, url_after = _split_after(url)
        self._client = client
        self._own_client: httpx.AsyncClient | None = None
        self._resume = resume
        self._headers = dict(headers)
        self._policy = retry
        self._http_timeout = http_timeout
        self._last_seq: int | None = after if after is not None else url_after
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending: collections.deque[ServerSentEvent] = collections.deque()
        self._decoder = SSEDecoder()
        self._failures = 0
        self._connections = 0
        self._retry_field = 0.0  # the server's ``retry:``, in seconds
        self._retry_after = 0.0  # a refusal's Retry-After, for the next reconnect only
        self._terminal: FlowEvent | None = None
        self._ended = False
        self._failed: BaseException | None = None
        self._closed = False

    # -- figures ----------------------------------------------------------------

    @property
    def last_seq(self) -> int | None:
        """The seq of the last event yielded (or the ``after`` asked for); ``None`` before any."""
        return self._last_seq

    @property
    def reconnects(self) -> int:
        """How many times the stream connected again after its first connection."""
        return max(0, self._connections - 1)

    @property
    def terminal(self) -> FlowEvent | None:
        """The run's terminal event, once it was yielded."""
        return self._terminal

    # -- iteration --------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> FlowEvent:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> FlowEvent:
        """The run's next event, waiting for it (and reconnecting) as needed.

        Returns:
            The next event, never one returned before.

        Raises:
            trio.EndOfChannel: the terminal event was returned already (or the
                server answered ``204 No Content``: the run ended, and
                nothing is left after ``after``).
            trio.ClosedResourceError: the stream was closed.
            StreamError: the server refused the request (``401``, ``404``, ...)
                or reported an error it does not recover from (``evicted``
                too, when ``resume`` is off).
            ResumeExpired: the server no longer has the events to resume from.
            trio.BrokenResourceError: the connection dropped and ``resume`` is
                off, or it failed ``retry.attempts`` times in a row; or an
                earlier call failed. ``__cause__`` is the error behind it.
            RuntimeError: the stream was not entered with ``async with``.

        Cancellation:
            If cancelled, no event is lost: the connection is dropped and the
            next call resumes after the last event returned.
        """
        while True:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the event stream was closed")
            if self._failed is not None:
                raise trio.BrokenResourceError("the event stream failed") from self._failed
            if self._terminal is not None or self._ended:
                raise trio.EndOfChannel
            try:
                if self._pending:
                    event = self._accept(self._pending.popleft())
                    if event is not None:
                        return event
                    continue
                if self._response is None:
                    await self._connect()
                await self._read()
            except (_Dropped, httpx.TransportError) as exc:
                await self._disconnect()
                try:
                    await self._backoff(exc)
                except Exception as error:
                    self._failed = error
                    raise
            except (trio.Cancelled, trio.EndOfChannel):
                await self._disconnect()
                raise
            except Exception as exc:
                await self._disconnect()
                self._failed = exc
                raise

    def _accept(self, sse: ServerSentEvent) -> FlowEvent | None:
        """The event a frame stands for, or ``None`` for one seen already."""
        if sse.event == ERROR_EVENT:
            self._server_error(sse.data)
        try:
            event = FlowEvent.from_json(sse.data)
        except ValueError as exc:
            raise StreamError(
                f"the server sent an invalid event: {exc}", code="invalid_event"
            ) from None
        seq = event.seq
        if not seq and sse.id.isdigit():
            seq = int(sse.id)
        last = self._last_seq
        if seq and last is not None and seq <= last:
            return None  # replayed again after a reconnect
        if seq:
            self._last_seq = seq
            self._failures = 0
        if event.is_terminal():
            self._terminal = event
            self._pending.clear()
        return event

    def _server_error(self, data: str) -> None:
        try:
            payload: Any = json.loads(data)
        except ValueError:
            payload = {"message": data}
        error = StreamError.from_payload(payload)
        if error.code in RESUMABLE_CODES and self._resume:
            raise _Dropped(f"the server ended the stream: {error}")
        raise error

    async def _connect(self) -> None:
        client = self._client or self._own_client
        if client is None:
            raise RuntimeError("enter the event stream with 'async with' before reading it")
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store", **self._headers}
        if self._last_seq is not None:
            headers["Last-Event-ID"] = str(self._last_seq)
        request = client.build_request("GET", self.url, headers=headers, timeout=self._http_timeout)
        self._connections += 1
        response = await client.send(request, stream=True)
        try:
            if response.status_code == 204:
                # Nothing after Last-Event-ID, and the run has ended: so has the stream.
                self._ended = True
                raise trio.EndOfChannel
            if response.status_code != 200:
                await self._refused(response)
            ctype = response.headers.get("content-type", "").partition(";")[0].strip()
            if ctype != "text/event-stream":
                raise StreamError(
                    f"expected an event stream from {self.url}, got {ctype or 'no content type'}",
                    code="not_an_event_stream",
                    status=response.status_code,
                )
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await response.aclose()
            raise
        self._response = response
        self._chunks = response.aiter_bytes()
        self._decoder = SSEDecoder()

    async def _refused(self, response: httpx.Response) -> None:
        status = response.status_code
        body = await response.aread()
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = {"message": body.decode("utf-8", "replace").strip() or response.reason_phrase}
        if status in (408, 429) or status >= 500:
            hint = response.headers.get("retry-after", "").strip()
            if hint.isdigit():
                self._retry_after = float(hint)
            raise _Dropped(f"the server answered {status}: {payload}")
        raise StreamError.from_payload(payload, status=status)

    async def _read(self) -> None:
        """Read until a frame is pending; raise :class:`_Dropped` at the end of the body."""
        assert self._chunks is not None
        decoder = self._decoder
        while not self._pending:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                raise _Dropped("the server closed the stream before the run ended") from None
            self._pending.extend(decoder.feed(chunk))
            if decoder.retry is not None:
                self._retry_field = decoder.retry / 1000

    async def _disconnect(self) -> None:
        response, self._response = self._response, None
        chunks, self._chunks = self._chunks, None
        self._pending.clear()
        if chunks is not None:
            # httpx reads the body through nested async generators; one dropped
            # while suspended is finalised by the garbage collector (which Trio
            # warns about). Read on under a cancelled scope instead: the next
            # socket read raises Cancelled, which ends every layer for good.
            with trio.CancelScope() as scope:
                scope.cancel()
                with contextlib.suppress(Exception):
                    while True:
                        await anext(chunks)
        if response is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await response.aclose()

    async def _backoff(self, error: Exception) -> None:
        self._failures += 1
        if not self._resume:
            raise trio.BrokenResourceError(
                f"the event stream {self.url} dropped ({error}) and resume is off"
            ) from error
        if self._failures >= self._policy.attempts or not self._policy.should_retry(error):
            raise trio.BrokenResourceError(
                f"the event stream {self.url} failed {self._failures} time(s) in a row; "
                f"last: {error}"
            ) from error
        delay = max(self._policy.next_delay(self._failures), self._retry_field, self._retry_after)
        self._retry_after = 0.0
        await trio.sleep(delay)

    # -- closing ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection (and the client, if the stream made it); idempotent.

        Later calls of :meth:`receive` raise :exc:`trio.ClosedResourceError`.
        """
        self._closed = True
        await self._disconnect()
        client, self._own_client = self._own_client, None
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await client.aclose()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        if self._closed:
            raise trio.ClosedResourceError("the event stream was closed")
        if self._client is None and self._own_client is None:
            # A plain-HTTP URL never uses TLS (redirects are not followed), so
            # skip loading the CA bundle, which takes about half a second.
            tls = urllib.parse.urlsplit(self.url).scheme != "http"
            self._own_client = httpx.AsyncClient(verify=tls)
        await trio.lowlevel.checkpoint()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def sse_events(
    url: str,
    *,
    resume: bool = True,
    after: int | None = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    client: httpx.AsyncClient | None = None,
    timeout: float | httpx.Timeout | None = 60.0,
) -> SSEEventStream:
    """Follow a run's event stream (``GET /runs/{id}/events``) for an ``async with`` block.

    ::

        async with sse_events(url, token="s3cret") as events:
            async for event in events:
                ...

    The stream yields every event of the run once, in seq order, from the
    first (or the one after ``after``) to the terminal event, then stops.
    When the connection drops, or the server evicts a slow client, it
    reconnects after a backoff with ``Last-Event-ID`` set to the last seq it
    yielded and skips whatever it has seen already: a dropped connection
    costs time, never an event. The server's ``retry:`` field is the
    shortest delay between reconnects.

    Args:
        url: the run's events URL (an ``after=`` query parameter is taken
            as ``after``).
        resume: reconnect after a dropped connection or an eviction; with
            ``False`` a drop raises :exc:`trio.BrokenResourceError` and an
            eviction a :class:`StreamError` with code ``evicted``.
        after: start after this seq; ``None`` for everything the server has.
        token: a bearer token, sent as ``Authorization: Bearer <token>``.
        headers: more request headers.
        retry: the reconnect backoff: ``retry.attempts`` connection attempts
            in a row that bring no new event end the stream with an error (an
            event resets the count); its ``retry_on`` says which errors are
            worth a reconnect.
        client: the :class:`httpx.AsyncClient` to use (left open); by
            default the stream makes one and closes it on exit.
        timeout: seconds for connecting and for each read: a stream silent
            for longer (no event, no keep-alive comment) counts as dropped.
            ``None`` for no limit; an :class:`httpx.Timeout` for finer control.

    Returns:
        The :class:`SSEEventStream`, to enter with ``async with``; it
        connects on the first read. Leaving the block closes the connection.
        :meth:`SSEEventStream.receive` lists the errors raised while reading.

    Raises:
        ValueError: ``after`` (or the URL's ``after``) is not an integer >= 0.
    """
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
        raise ValueError(f"'after' must be an int >= 0 or None, not {after!r}")
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    return SSEEventStream(
        url,
        client=client,
        resume=resume,
        after=after,
        headers=all_headers,
        retry=retry,
        http_timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout),
    )
