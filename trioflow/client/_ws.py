"""Starting and following runs over a WebSocket: :func:`ws_connect`.

Works with both of the server's WebSocket endpoints::

    # /ws: start any number of runs, follow them all over one connection
    async with ws_connect("ws://127.0.0.1:8000/ws", token="s3cret") as conn:
        run_id = await conn.start("What is 25 * 4?")
        async for event in conn.run_events(run_id):
            print(event.type, dict(event.data))

    # /runs/{id}/ws: follow one run; the iteration ends after its terminal event
    async with ws_connect(run_info["ws_url"]) as conn:
        async for event in conn:
            ...

Events arrive as :class:`~trioflow.FlowEvent`. The server's ``error`` frames
become :class:`~trioflow.client.StreamError` exceptions: the one answering a
:meth:`~WsConnection.start` is raised by that call; the others are raised,
in order with the events, by the next :meth:`~WsConnection.receive` (or
iteration) that would have returned an event of that run. The connection
stays usable after such an error. An ``evicted`` error (the client fell
behind) is handled by the connection itself: it resumes the run after the
last event it received, so the consumer sees no gap and no duplicate.
"""

from __future__ import annotations

import collections
import itertools
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from trioflow._util import collapse_single_group
from trioflow.client._errors import StreamError
from trioflow.events import FlowEvent
from trioflow.protocol import RESUMABLE_CODES

__all__ = ["NORMAL_CLOSURE", "ConnectionClosed", "WsConnection", "ws_connect"]

NORMAL_CLOSURE: Final = 1000
"""The close code of a connection that ended as planned (a run's terminal event was sent)."""

_Item = FlowEvent | StreamError


class WsConnection:
    """One WebSocket connection to a trioflow server; made by :func:`ws_connect`.

    Received events (and the server's error reports) wait in a buffer of
    ``buffer`` items until they are read with :meth:`receive`, ``async for``
    or :meth:`run_events`. Each is delivered once, to one reader. When the
    buffer is full, the connection stops reading from the socket (and the
    server, in turn, evicts and later resumes the run): read the events of
    every run you follow, or the connection stalls.

    Attributes:
        url: the WebSocket URL.
        run_id: the run of a ``/runs/{id}/ws`` connection; ``None`` on ``/ws``.
    """

    def __init__(self, ws: WebSocketConnection, url: str, *, buffer: int, resume: bool) -> None:
        self.url = url
        self.run_id = _run_of(url)
        self._ws = ws
        self._buffer = buffer
        self._resume = resume
        self._items: collections.deque[_Item] = collections.deque()
        self._changed = trio.lowlevel.ParkingLot()
        self._starts: dict[str, trio.Event] = {}
        self._started: dict[str, str | StreamError] = {}
        self._refs = itertools.count(1)
        self._last_seq: dict[str, int] = {}
        self._finished: set[str] = set()
        self._closed: CloseReason | None = None
        self._send_lock = trio.Lock()

    # -- state ----------------------------------------------------------------------

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed (code and reason), or ``None`` while it is open."""
        return self._closed

    def last_seq(self, run_id: str) -> int:
        """The seq of the last event received of run ``run_id`` (``0`` before any)."""
        return self._last_seq.get(run_id, 0)

    # -- requests -------------------------------------------------------------------

    async def start(
        self,
        task: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the run's limit, sent to the server
        max_iterations: int | None = None,
        on_disconnect: str | None = None,
    ) -> str:
        """Start a run on the server (``/ws`` only); its events follow on this connection.

        Args:
            task: what to ask the agent.
            timeout: the run's time limit in seconds.
            max_iterations: the run's iteration budget.
            on_disconnect: ``"continue"`` (the server's default) or
                ``"cancel"``: what happens to the run when this connection
                goes away.

        Returns:
            The new run's id.

        Raises:
            StreamError: the server refused to start the run (``invalid_request``,
                ``too_many_runs``, ``shutting_down``; ``unknown_action`` on a
                ``/runs/{id}/ws`` connection).
            ConnectionClosed: the connection closed before the server answered.

        Cancellation:
            If cancelled after the request was sent, the run may still start;
            its events then arrive like any other.
        """
        ref = f"start-{next(self._refs)}"
        message: dict[str, Any] = {"action": "start", "task": task, "ref": ref}
        if timeout is not None:
            message["timeout"] = timeout
        if max_iterations is not None:
            message["max_iterations"] = max_iterations
        if on_disconnect is not None:
            message["on_disconnect"] = str(on_disconnect)
        answered = self._starts[ref] = trio.Event()
        try:
            await self._send(message)
            while not answered.is_set():
                if self._closed is not None:
                    raise ConnectionClosed(self._closed)
                await self._changed.park()
            answer = self._started.pop(ref)
        finally:
            self._starts.pop(ref, None)
            self._started.pop(ref, None)
        if isinstance(answer, StreamError):
            raise answer
        return answer

    async def cancel(self, run_id: str | None = None) -> None:
        """Ask the server to cancel a run; it ends with ``flow.cancelled``, which follows here.

        Cancelling a run that has finished already does nothing (the
        server's ``run_finished`` answer is dropped).

        Args:
            run_id: the run; on a ``/runs/{id}/ws`` connection, ``None``
                means its run.

        Raises:
            ValueError: ``run_id`` is ``None`` on a ``/ws`` connection.
            ConnectionClosed: the connection is closed.
        """
        message: dict[str, Any] = {"action": "cancel", "ref": "cancel"}
        message["run_id"] = self._target(run_id)
        await self._send(message)

    async def resume(self, after: int, *, run_id: str | None = None) -> None:
        """Follow a run from the event after seq ``after`` (replay, then live).

        On ``/ws`` this also follows a run started elsewhere (``after=0``
        for all of its events). Events received on this connection before
        are never delivered again: the replay skips them.

        Args:
            after: the seq to resume after (``0``: from the first event).
            run_id: the run; on a ``/runs/{id}/ws`` connection, ``None``
                means its run.

        Raises:
            ValueError: ``after`` is negative, or ``run_id`` is ``None`` on ``/ws``.
            ConnectionClosed: the connection is closed.

        The server answers a resume point it cannot serve with an error
        (``invalid_after``, ``run_not_found``, ``history_expired``), raised
        by a later :meth:`receive`.
        """
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"'after' must be an int >= 0, not {after!r}")
        rid = self._target(run_id)
        self._finished.discard(rid)
        await self._send({"action": "resume", "run_id": rid, "after": after, "ref": "resume"})

    def _target(self, run_id: str | None) -> str:
        rid = run_id or self.run_id
        if rid is None:
            raise ValueError("name the run: run_id is required on a /ws connection")
        return rid

    async def send_raw(self, message: str) -> None:
        """Send ``message`` as a text frame, as it is (for protocol tests and extensions).

        Raises:
            ConnectionClosed: the connection is closed.
        """
        async with self._send_lock:
            await self._ws.send_message(message)

    async def _send(self, message: Mapping[str, Any]) -> None:
        await self.send_raw(json.dumps(message, separators=(",", ":")))

    # -- receiving ------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[FlowEvent]:
        return self.events()

    async def events(self) -> AsyncIterator[FlowEvent]:
        """Every event received, of any run, in arrival order, until a normal close.

        Yields:
            Events, as :meth:`receive` returns them.

        Raises:
            StreamError: as :meth:`receive`.
            ConnectionClosed: the connection closed with another code than
                ``1000`` (normal closure ends the iteration).
        """
        while True:
            try:
                event = await self.receive()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == NORMAL_CLOSURE:
                    return
                raise
            yield event

    async def run_events(self, run_id: str) -> AsyncIterator[FlowEvent]:
        """The events of run ``run_id`` only, until (and including) its terminal event.

        Yields:
            The run's events, in seq order, each once.

        Raises:
            StreamError: an error the server reported for this run (or for
                no run in particular).
            ConnectionClosed: the connection closed before the run's terminal event.
        """
        while run_id not in self._finished or self._has(run_id):
            event = await self.receive(run_id=run_id)
            yield event
            if event.is_terminal():
                return

    def _has(self, run_id: str) -> bool:
        return any(_matches(item, run_id) for item in self._items)

    async def receive(self, *, run_id: str | None = None) -> FlowEvent:
        """The next event (of run ``run_id``, if given), waiting for it.

        Returns:
            The next event not delivered yet.

        Raises:
            StreamError: the next thing the server sent (for that run) is an
                error report: ``history_expired``, ``invalid_after``,
                ``run_not_found``, ``invalid_message``, ... The connection
                stays open.
            ConnectionClosed: the connection is closed and every event
                received before was delivered; ``.reason`` has the close
                code and reason.
        """
        await trio.lowlevel.checkpoint()
        while True:
            item = self._take(run_id)
            if item is not None:
                self._changed.unpark_all()
                if isinstance(item, StreamError):
                    raise item
                return item
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            await self._changed.park()

    def _take(self, run_id: str | None) -> _Item | None:
        items = self._items
        if not items:
            return None
        if run_id is None:
            return items.popleft()
        for index, item in enumerate(items):
            if _matches(item, run_id):
                del items[index]
                return item
        return None

    # -- the reader task --------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                while len(self._items) >= self._buffer:
                    await self._changed.park()
                message = await self._ws.get_message()
                await self._dispatch(message)
        except ConnectionClosed as exc:
            self._closed = exc.reason
        finally:
            if self._closed is None:
                self._closed = self._ws.closed or CloseReason(1006, "the connection was dropped")
            self._changed.unpark_all()

    async def _dispatch(self, message: str | bytes) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            self._put(
                StreamError(
                    "the server sent a frame that is not a JSON object", code="invalid_frame"
                )
            )
            return
        if "id" in frame:
            self._event(frame)
        elif frame.get("type") == "accepted":
            self._answer(frame.get("ref"), str(frame.get("run_id")))
        elif frame.get("type") == "error":
            await self._error(frame)
        # Other control frames are for newer clients: skip them.

    def _event(self, frame: Mapping[str, Any]) -> None:
        try:
            event = FlowEvent.from_dict(frame)
        except ValueError as exc:
            self._put(StreamError(f"the server sent an invalid event: {exc}", code="invalid_event"))
            return
        rid = event.run_id or self.run_id or ""
        if event.seq and event.seq <= self._last_seq.get(rid, 0):
            return  # replayed again after a resume
        if event.seq:
            self._last_seq[rid] = event.seq
        if event.is_terminal():
            self._finished.add(rid)
        self._put(event)

    def _answer(self, ref: object, answer: str | StreamError) -> None:
        if isinstance(ref, str) and ref in self._starts:
            self._started[ref] = answer
            self._starts[ref].set()
            self._changed.unpark_all()

    async def _error(self, frame: Mapping[str, Any]) -> None:
        error = StreamError.from_payload(frame)
        ref = frame.get("ref")
        if isinstance(ref, str) and ref in self._starts:
            self._answer(ref, error)
            return
        if frame.get("action") == "cancel" and error.code == "run_finished":
            return
        rid = frame.get("run_id") or self.run_id
        if error.code in RESUMABLE_CODES and self._resume and isinstance(rid, str):
            after = self._last_seq.get(rid, 0)
            await self._send({"action": "resume", "run_id": rid, "after": after, "ref": "resume"})
            return
        if isinstance(rid, str) and "run_id" not in error.data:
            error.data = {**error.data, "run_id": rid}
        self._put(error)

    def _put(self, item: _Item) -> None:
        self._items.append(item)
        self._changed.unpark_all()

    # -- closing --------------------------------------------------------------------

    async def aclose(self, code: int = NORMAL_CLOSURE, reason: str | None = None) -> None:
        """Close the connection (idempotent); events not read yet are discarded."""
        await self._ws.aclose(code, reason)
        self._closed = self._closed or self._ws.closed or CloseReason(code, reason)
        self._changed.unpark_all()


def _matches(item: _Item, run_id: str) -> bool:
    if isinstance(item, FlowEvent):
        return item.run_id == run_id
    rid = item.data.get("run_id")
    return rid is None or rid == run_id


def _run_of(url: str) -> str | None:
    """The run id of a ``.../runs/{id}/ws`` URL."""
    parts = urllib.parse.urlsplit(url).path.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-1] == "ws" and parts[-3] == "runs":
        return urllib.parse.unquote(parts[-2])
    return None


def _ws_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL: {url!r} (use ws://, wss://, http:// or https://)")
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme))


@asynccontextmanager
async def ws_connect(
    url: str,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    buffer: int = 1024,
    resume: bool = True,
    connect_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[WsConnection]:
    """Connect to a trioflow WebSocket endpoint for the ``async with`` block.

    Args:
        url: ``ws://host:port/ws`` (start and follow runs) or a run's
            ``ws_url``, ``ws://host:port/runs/{id}/ws`` (``?after=<seq>`` to
            start after an event); ``http://`` and ``https://`` are taken as
            ``ws://`` and ``wss://``.
        token: a bearer token, sent as ``Authorization: Bearer <token>``.
        headers: more handshake headers.
        buffer: how many received items may wait to be read (>= 1).
        resume: when the server evicts the connection from a run for
            falling behind, resume it after the last event received (so the
            consumer sees no gap); with ``False`` the eviction is raised as
            a :class:`~trioflow.client.StreamError` with code ``evicted``.
        connect_timeout: seconds the TCP connection and handshake may take.
        ssl_context: the TLS context of a ``wss://`` (or ``https://``)
            connection, to trust a private certificate authority or a
            self-signed server certificate
            (``ssl.create_default_context(cafile="cert.pem")``); ``None``:
            :func:`ssl.create_default_context`, which verifies the server's
            certificate against the system's authorities. Unused for ``ws://``.

    Yields:
        The :class:`WsConnection`. Leaving the block closes it (code ``1000``).

    Raises:
        StreamError: the server refused the handshake (``401``
            ``unauthorized``, ``404`` ``run_not_found``, ...); ``status`` is
            the HTTP status.
        trio_websocket.HandshakeError: the handshake failed otherwise.
        trio.BrokenResourceError: the TLS handshake failed; its
            ``__cause__`` (an :exc:`ssl.SSLError`) says why, such as
            :exc:`ssl.SSLCertVerificationError` for a server certificate
            that ``ssl_context`` does not trust.
        trio.TooSlowError: connecting took longer than ``connect_timeout``.
        OSError: the server cannot be reached.
        ValueError: ``url`` is not a ``ws``/``wss``/``http``/``https`` URL,
            or ``buffer`` < 1.
    """
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"buffer must be an int >= 1, not {buffer!r}")
    ws_url = _ws_url(url)
    extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if token is not None:
        extra.append((b"Authorization", f"Bearer {token}".encode("latin-1")))
    parts = urllib.parse.urlsplit(ws_url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The stream is ours, not trio-websocket's: it leaves the socket open when
    # the server closes first (as it does after a run's terminal event).
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    try:
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                with trio.fail_after(connect_timeout):
                    if secure:
                        stream = await trio.open_ssl_over_tcp_stream(
                            parts.hostname or "",
                            port,
                            ssl_context=ssl_context or ssl.create_default_context(),
                            https_compatible=True,
                        )
                        # Here, not in trio-websocket's reader task, where a
                        # refused certificate would leave the handshake waiting.
                        await stream.do_handshake()
                    else:
                        stream = await trio.open_tcp_stream(parts.hostname or "", port)
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        parts.netloc.rpartition("@")[2],
                        resource,
                        extra_headers=extra,
                        message_queue_size=16,
                    )
                conn = WsConnection(ws, ws_url, buffer=buffer, resume=resume)
                nursery.start_soon(conn._read)
                try:
                    yield conn
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await conn.aclose()
                    nursery.cancel_scope.cancel()
    except ConnectionRejected as exc:
        raise _rejected(exc) from None
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


def _rejected(exc: ConnectionRejected) -> StreamError:
    body = exc.body or b""
    try:
        payload: Any = json.loads(body)
    except ValueError:
        payload = {"message": body.decode("utf-8", "replace").strip() or "handshake refused"}
    return StreamError.from_payload(payload, status=exc.status_code)
