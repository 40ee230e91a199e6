"""What the local API servers of :mod:`trioflow.testing` share: HTTP, scripts, records.

:class:`ScriptedServer` is an HTTP/1.1 server on Trio alone (``trio.serve_tcp``
and the sans-I/O ``h11`` parser) that answers ``POST`` requests to one path
from a *script*, a list of replies consumed one per request, and records
every request (:class:`RecordedRequest`). It sends whole JSON responses
and streamed ``text/event-stream`` bodies (paced, held at a gate, cut short),
notices a client that closes a response before its end, and counts all of it
(:class:`ServerStatistics`). :class:`~trioflow.testing.AnthropicServer` and
:class:`~trioflow.testing.OpenAIServer` subclass it with the wire format of
their API.
"""

from __future__ import annotations

import abc
import dataclasses
import email.utils
import functools
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import h11
import trio

__all__ = ["RecordedRequest", "ScriptedServer", "ServerStatistics", "ToolUse", "serving"]

_MAX_BODY = 16 * 1024 * 1024
_RECEIVE_SIZE = 65536

ReplyT = TypeVar("ReplyT")
ServerT = TypeVar("ServerT", bound="ScriptedServer[Any]")


# -- script items ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ToolUse:
    """A tool call of a scripted reply, its input streamed in pieces.

    The input is sent as its JSON text cut into pieces of ``chunk_size``
    characters, or as the verbatim ``partial_json`` pieces when given (to
    send JSON that does not parse, for example): a ``tool_use`` block with
    ``input_json_delta`` events in a :class:`~trioflow.testing.StreamedReply`,
    a tool call with ``function.arguments`` chunks in a
    :class:`~trioflow.testing.ChatReply`.

    Raises:
        ValueError: ``chunk_size`` < 1.
    """

    name: str
    """The tool's name."""
    input: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The tool's input, a JSON object."""
    id: str | None = None
    """The call's id; when ``None``, ``toolu_test<request><index>`` (Anthropic) or
    ``call_test<request><index>`` (OpenAI)."""
    chunk_size: int = 8
    """Characters of input JSON per piece."""
    partial_json: Sequence[str] | None = None
    """Verbatim ``partial_json`` pieces that replace the encoded ``input``."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {self.chunk_size!r}")

    def json_pieces(self) -> list[str]:
        """The ``partial_json`` strings this block streams, in order."""
        if self.partial_json is not None:
            return list(self.partial_json)
        text = json.dumps(dict(self.input), separators=(",", ":"), ensure_ascii=False)
        return [text[i : i + self.chunk_size] for i in range(0, len(text), self.chunk_size)]


# -- records --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request the server received, as tests inspect it."""

    method: str
    """The HTTP method."""
    path: str
    """The request target's path, without the query."""
    headers: Mapping[str, str]
    """The headers, names in lower case (the last value of a repeated header)."""
    body: Any
    """The body parsed as JSON, or ``None`` if it was empty or not JSON."""
    time: float
    """When the request arrived, on Trio's clock (:func:`trio.current_time`)."""
    reply: Any
    """The scripted reply the request consumed, or ``None``."""
    unscripted: bool = False
    """True if the request found the script exhausted (and got a 500)."""

    @property
    def api_key(self) -> str | None:
        """The credential the client sent: ``x-api-key``, or the ``Authorization: Bearer`` token."""
        key = self.headers.get("x-api-key")
        if key is not None:
            return key
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None


@dataclasses.dataclass(frozen=True, slots=True)
class ServerStatistics:
    """Counters of a :class:`ScriptedServer`, as returned by its ``statistics()``."""

    requests: int
    """HTTP requests received, on any path."""
    open_connections: int
    """TCP connections open now."""
    active_responses: int
    """Streamed responses being sent now."""
    completed_responses: int
    """Streamed responses sent to their end."""
    disconnects: int
    """Streamed responses the client closed before their end."""
    dropped: int
    """Responses the server cut short on purpose (a scripted disconnect), once sent."""
    script_remaining: int
    """Scripted replies not consumed yet."""
    unscripted: int
    """Requests to the API's path that found the script exhausted."""


# -- the server -----------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Incoming:
    request: h11.Request
    body: bytes


class _Timing(Protocol):
    """How a scripted reply is paced and held (its ``pace``, ``gate``, ``gate_after``)."""

    @property
    def pace(self) -> float: ...
    @property
    def gate(self) -> trio.Event | None: ...
    @property
    def gate_after(self) -> int: ...


class _ClientGone(Exception):
    """The client closed the connection while a response was being sent."""


class ScriptedServer(abc.ABC, Generic[ReplyT]):
    """An HTTP server that answers ``POST`` requests to :attr:`path` from a script.

    Subclasses set :attr:`path` and :attr:`request_id_header` and answer each
    request with its scripted reply. Run it in a nursery with ``await
    nursery.start(server.serve)``, or with the ``open_*_server`` function of
    the subclass.

    Other paths get ``404``, other methods ``405``, a body that is not a JSON
    object ``400``, and a request that finds the script exhausted ``500``
    (counted in :attr:`ServerStatistics.unscripted`), each in the API's error
    shape.

    Args:
        script: The replies, consumed one per request to :attr:`path`.
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.
    """

    path: ClassVar[str]
    """The API's path (``/v1/messages``, ``/v1/chat/completions``)."""
    request_id_header: ClassVar[str] = "request-id"
    """The response header carrying the request's id (``req_test<number>``)."""

    def __init__(
        self, script: Iterable[ReplyT] = (), *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._script: deque[ReplyT] = deque(script)
        self._host = host
        self._port = port
        self._base_url: str | None = None
        self.requests: list[RecordedRequest] = []
        """Every request received, in order of arrival."""
        self._open_connections = 0
        self._active_responses = 0
        self._completed = 0
        self._disconnects = 0
        self._dropped = 0
        self._unscripted = 0
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._base_url or 'not started'}>"

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>``, the URL to give the SDK's ``base_url``.

        Raises:
            RuntimeError: the server is not serving yet.
        """
        if self._base_url is None:
            raise RuntimeError("the server is not serving yet: start it with nursery.start")
        return self._base_url

    def add(self, *replies: ReplyT) -> None:
        """Append ``replies`` to the script."""
        self._script.extend(replies)
        self._notify()

    def statistics(self) -> ServerStatistics:
        """The server's counters, as a frozen record."""
        return ServerStatistics(
            requests=len(self.requests),
            open_connections=self._open_connections,
            active_responses=self._active_responses,
            completed_responses=self._completed,
            disconnects=self._disconnects,
            dropped=self._dropped,
            script_remaining=len(self._script),
            unscripted=self._unscripted,
        )

    async def wait_until(self, predicate: Callable[[ServerStatistics], bool]) -> ServerStatistics:
        """Wait until ``predicate(self.statistics())`` is true.

        Returns:
            The statistics that satisfied ``predicate``.

        Cancellation:
            Safe to cancel (wrap it in :func:`trio.fail_after` in tests).
        """
        while True:
            stats = self.statistics()
            if predicate(stats):
                return stats
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled.

        Calls ``task_status.started(base_url)`` once it listens.

        Raises:
            OSError: the address could not be bound.

        Cancellation:
            Cancelling stops listening and closes every connection at once.
        """
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SocketListener] = await nursery.start(
                functools.partial(trio.serve_tcp, self._handle, self._port, host=self._host)
            )
            host, port = listeners[0].socket.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            self._base_url = f"http://{host}:{port}"
            task_status.started(self._base_url)

    # -- connections ------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        self._open_connections += 1
        self._notify()
        try:
            while True:
                incoming = await self._receive_request(stream, conn)
                if incoming is None:
                    break
                keep_open = await self._respond(stream, conn, incoming)
                if not keep_open or conn.our_state is not h11.DONE:
                    break
                if conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except h11.RemoteProtocolError:
            pass
        finally:
            self._open_connections -= 1
            self._notify()
            stream.socket.close()

    async def _receive_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> _Incoming | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return _Incoming(request, bytes(body))
            else:  # ConnectionClosed, or PAUSED, which cannot happen here
                return None

    async def _respond(
        self, stream: trio.SocketStream, conn: h11.Connection, incoming: _Incoming
    ) -> bool:
        """Answer one request; returns whether the connection may be kept open."""
        request = incoming.request
        method = request.method.decode("ascii", "replace")
        path = request.target.decode("ascii", "replace").partition("?")[0]
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
        body: Any = None
        valid_json = True
        if incoming.body:
            try:
                body = json.loads(incoming.body)
            except ValueError:
                valid_json = False
        now = trio.current_time()

        def record(reply: ReplyT | None, *, unscripted: bool = False) -> None:
            self.requests.append(
                RecordedRequest(method, path, headers, body, now, reply, unscripted)
            )
            self._notify()

        if path != self.path:
            record(None)
            await self._send_plain_error(stream, conn, 404, f"Not found: {method} {path}")
            return True
        if method != "POST":
            record(None)
            await self._send_plain_error(stream, conn, 405, f"Method not allowed: {method}")
            return True
        if not valid_json or not isinstance(body, dict):
            record(None)
            await self._send_plain_error(stream, conn, 400, "The request body is not valid JSON.")
            return True
        if not self._script:
            self._unscripted += 1
            record(None, unscripted=True)
            message = (
                f"trioflow test server: script exhausted; request {len(self.requests)} "
                "had no scripted reply"
            )
            await self._send_plain_error(stream, conn, 500, message)
            return True
        reply = self._script.popleft()
        record(reply)
        return await self._answer(stream, conn, reply, body, len(self.requests))

    @abc.abstractmethod
    async def _answer(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        reply: ReplyT,
        body: dict[str, Any],
        number: int,
    ) -> bool:
        """Answer request number ``number`` (its JSON ``body``) with ``reply``.

        Returns:
            Whether the connection may be kept open.
        """

    @abc.abstractmethod
    async def _send_plain_error(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, message: str
    ) -> None:
        """Send an error of the server's own (404, 405, 400, 500) in the API's shape."""

    def _request_id(self, number: int) -> str:
        return f"req_test{number:06d}"

    async def _send_json_error(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        retry_after: float | None,
    ) -> None:
        """Send ``body`` as JSON with ``status``, ``headers`` and a ``retry-after`` header."""
        number = len(self.requests)
        payload = json.dumps(body).encode()
        extra = list(headers.items())
        if retry_after is not None:
            value = retry_after
            extra.append(("retry-after", str(int(value)) if value == int(value) else str(value)))
        await self._send_whole(stream, conn, status, "application/json", payload, extra, number)

    async def _stream_reply(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        frames: list[bytes],
        timing: _Timing,
        *,
        number: int,
        keep: int | None = None,
        tail: bytes | None = None,
        complete_body: bool = False,
    ) -> bool:
        """Stream ``frames`` as ``timing`` says: all, or the first ``keep`` then ``tail``.

        With ``keep`` and no ``tail`` the reply is cut: the connection drops
        after the kept frames, unless ``complete_body`` ends the body cleanly.

        Returns:
            Whether the connection may be kept open.
        """
        cut = False
        if keep is not None:
            frames = frames[: max(0, keep)]
            if tail is None:
                cut = True
            else:
                frames.append(tail)
        complete = not cut or complete_body
        await self._send_stream(
            stream,
            conn,
            frames,
            number=number,
            end=complete,
            cut=cut,
            pace=timing.pace,
            gate=timing.gate,
            gate_after=timing.gate_after,
        )
        return complete

    def _count_dropped(self) -> None:
        self._dropped += 1
        self._notify()

    def _headers(self, content_type: str, number: int) -> list[tuple[str, str]]:
        return [
            ("date", email.utils.formatdate(usegmt=True)),
            ("content-type", content_type),
            (self.request_id_header, self._request_id(number)),
            ("server", "trioflow-test"),
        ]

    async def _send_whole(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        content_type: str,
        payload: bytes,
        extra: Iterable[tuple[str, str]],
        number: int,
    ) -> None:
        headers = [*self._headers(content_type, number), *extra]
        headers.append(("content-length", str(len(payload))))
        data = conn.send(h11.Response(status_code=status, headers=headers))
        data += conn.send(h11.Data(data=payload))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)

    async def _send_stream(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        frames: list[bytes],
        *,
        number: int,
        end: bool,
        cut: bool,
        pace: float = 0.0,
        gate: trio.Event | None = None,
        gate_after: int = 0,
    ) -> None:
        """Send the frames, paced and gated; end the body if ``end``; count a ``cut`` as dropped.

        Before frame number ``gate_after`` it waits for ``gate`` (when set),
        and before each frame it sleeps ``pace`` seconds.

        Raises:
            _ClientGone: the client closed the connection before the end.
        """
        headers = self._headers("text/event-stream; charset=utf-8", number)
        headers.append(("cache-control", "no-cache"))
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
        self._active_responses += 1
        self._notify()
        gone = False  # the client closed the connection...
        sent = False  # ... and counts as a disconnect only if that was before the end

        async def watch(cancel_scope: trio.CancelScope) -> None:
            # The client sends nothing while it reads a response, so the end
            # of its side of the connection means that it closed the response.
            nonlocal gone
            while True:
                try:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    gone = True
                    cancel_scope.cancel()
                    return
                conn.receive_data(data)  # a pipelined request, kept for later

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, nursery.cancel_scope)
                try:
                    for index, frame in enumerate(frames):
                        if gate is not None and index == gate_after:
                            await gate.wait()
                        if pace:
                            await trio.sleep(pace)
                        data = conn.send(h11.Data(data=frame))
                        if end and index == len(frames) - 1:
                            data += conn.send(h11.EndOfMessage())
                        await stream.send_all(data)
                    if end and not frames:
                        await stream.send_all(conn.send(h11.EndOfMessage()))
                    sent = True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    gone = True
                nursery.cancel_scope.cancel()
        finally:
            self._active_responses -= 1
            gone = gone and not sent
            if gone:
                self._disconnects += 1
            elif sent and cut:
                self._dropped += 1
            elif sent:
                self._completed += 1
            self._notify()
        if gone:
            raise _ClientGone


@asynccontextmanager
async def serving(server: ServerT) -> AsyncIterator[ServerT]:
    """Run ``server`` in a nursery of its own for the duration of the ``async with`` block.

    Yields:
        ``server``, serving: its ``base_url`` is ready.

    Raises:
        OSError: the address could not be bound.

    Cancellation:
        Leaving the block, normally or not, stops the server and closes its
        connections.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
