"""A local HTTP server that speaks the Anthropic Messages streaming protocol, for tests.

Tests drive the real ``anthropic`` SDK over real HTTP against this server on
``127.0.0.1``: nothing of the SDK or of its HTTP client is mocked. The server
plays a *script*, a list of replies consumed one per ``POST /v1/messages``
request:

- :class:`StreamedReply`: a message streamed as Server-Sent Events, with text
  deltas, ``tool_use`` blocks whose input JSON arrives in ``input_json_delta``
  pieces, a stop reason and token usage;
- :class:`ErrorReply`: an API error (``429 rate_limit_error``, ``529
  overloaded_error``, ``500 api_error``, ``401 authentication_error``, ...),
  optionally with a ``retry-after`` header;
- :class:`DisconnectAfter`: the first events of a streamed reply, then the
  connection is closed mid-response;
- :class:`ErrorEventAfter`: the first events of a streamed reply, then an
  ``error`` event, as the API sends when it becomes overloaded mid-stream.

A streamed reply may also carry *raw* bytes, sent verbatim between its
events (:attr:`StreamedReply.raw`), to play a server or a proxy that
corrupts the stream: a ``data:`` line that is not JSON, bytes that are not
UTF-8.

Each streamed reply may be paced (a :func:`trio.sleep` before each event) or
held at a *gate* (a :class:`trio.Event`) so that tests can observe a consumer
mid-stream. The server records every request it receives
(:attr:`AnthropicServer.requests`) and counts connections and the responses
that the client closed before their end (:meth:`AnthropicServer.statistics`),
which proves that a cancelled consumer releases its HTTP response promptly::

    script = [ErrorReply(429, "rate_limit_error", retry_after=2), StreamedReply(text=["Hi"])]
    async with open_anthropic_server(script) as server:
        client = anthropic.AsyncAnthropic(api_key="test", base_url=server.base_url)
        ...
        assert server.statistics().requests == 2

The wire format follows the API byte for byte where the SDK can tell: a
``200`` response of type ``text/event-stream`` in chunked transfer encoding
carrying ``message_start``, ``ping``, ``content_block_start``,
``content_block_delta``, ``content_block_stop``, ``message_delta`` and
``message_stop`` events, each a compact JSON ``data:`` line; errors are JSON
``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the
status code and a ``request-id`` header. Unknown paths get ``404``; a request
that finds the script exhausted gets ``500 api_error`` and is counted in
:attr:`AnthropicServerStatistics.unscripted`.

The server runs on Trio alone (``trio.serve_tcp`` and the sans-I/O ``h11``
HTTP/1.1 parser) and starts with ``nursery.start``.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypedDict

import h11
import trio

from trioflow.sse import encode

__all__ = [
    "AnthropicServer",
    "AnthropicServerStatistics",
    "DisconnectAfter",
    "ErrorEventAfter",
    "ErrorReply",
    "RecordedRequest",
    "Reply",
    "StreamedReply",
    "ToolUse",
    "encode_sse",
    "open_anthropic_server",
]

_MAX_BODY = 16 * 1024 * 1024
_RECEIVE_SIZE = 65536

_DEFAULT_ERROR_MESSAGES: Mapping[str, str] = {
    "invalid_request_error": "Invalid request.",
    "authentication_error": "invalid x-api-key",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "The requested resource could not be found.",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit.",
    "api_error": "Internal server error",
    "overloaded_error": "Overloaded",
}


def encode_sse(event: str, data: Mapping[str, Any]) -> bytes:
    """Encode one Server-Sent Event as the Messages API does.

    Returns:
        An ``event:`` line, a ``data:`` line of compact JSON and a blank line, in UTF-8.
    """
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return encode(payload, event=event).encode()


# -- the script -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ToolUse:
    """A ``tool_use`` content block of a :class:`StreamedReply`.

    The input is sent as its JSON text cut into ``input_json_delta`` pieces
    of ``chunk_size`` characters, or as the verbatim ``partial_json`` pieces
    when given (to send JSON that does not parse, for example).

    Raises:
        ValueError: ``chunk_size`` < 1.
    """

    name: str
    """The tool's name."""
    input: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The tool's input, a JSON object."""
    id: str | None = None
    """The block's id; ``toolu_test<request><index>`` when ``None``."""
    chunk_size: int = 8
    """Characters of input JSON per ``input_json_delta`` event."""
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


@dataclasses.dataclass(frozen=True, slots=True)
class StreamedReply:
    """A message streamed as the Messages API streams it.

    The events, in order: ``message_start``, ``ping``, then a text block
    (``content_block_start``, one ``content_block_delta`` per item of
    ``text``, ``content_block_stop``) if ``text`` is not empty, then one block
    per :class:`ToolUse` (start, one delta per JSON piece, stop), then
    ``message_delta`` and ``message_stop``. :meth:`sse_events` lists them, so
    a test can count where to cut or hold the stream.

    A request without ``"stream": true`` gets the same message as one JSON
    object instead.

    Raises:
        ValueError: an index of :attr:`raw` is negative.
    """

    text: Sequence[str] = ()
    """The text deltas, in order."""
    tool_uses: Sequence[ToolUse] = ()
    """The ``tool_use`` blocks, after the text."""
    stop_reason: str | None = None
    """The stop reason; when ``None``: ``"tool_use"`` with tool uses, else ``"end_turn"``."""
    input_tokens: int = 25
    """``usage.input_tokens`` of ``message_start``."""
    output_tokens: int | None = None
    """``usage.output_tokens`` of ``message_delta``; one per delta event when ``None``."""
    model: str | None = None
    """The model named in the message; the requested model when ``None``."""
    pace: float = 0.0
    """Seconds to :func:`trio.sleep` before each event (on Trio's clock)."""
    gate: trio.Event | None = None
    """When set, the server sends ``gate_after`` events, then waits for this event."""
    gate_after: int = 0
    """How many events to send before waiting for ``gate``."""
    raw: Sequence[tuple[int, bytes]] = ()
    """Verbatim bytes to send before event number ``index`` (0-based, as
    listed by :meth:`sse_events`; an index past the last event sends them
    after it), as ``(index, bytes)`` pairs: a ``data:`` line that is not JSON,
    bytes that are not UTF-8. Write the whole block, its ending blank line
    included (a ``data:`` line, then two line feeds). They travel with the event they precede, so a
    :class:`DisconnectAfter` that cuts before that event drops them too."""

    def __post_init__(self) -> None:
        for index, _ in self.raw:
            if index < 0:
                raise ValueError(f"raw indexes must be >= 0, not {index!r}")

    def sse_frames(
        self, *, model: str = "claude-test", message_id: str = "msg_test", request: int = 0
    ) -> list[bytes]:
        """The bytes sent for each event of :meth:`sse_events`, with :attr:`raw` prepended.

        Bytes of :attr:`raw` whose index is past the last event are appended
        to the last frame.
        """
        events = self.sse_events(model=model, message_id=message_id, request=request)
        frames = [encode_sse(name, data) for name, data in events]
        for index, data in self.raw:
            if index < len(frames):
                frames[index] = data + frames[index]
            else:
                frames[-1] += data
        return frames

    def sse_events(
        self, *, model: str = "claude-test", message_id: str = "msg_test", request: int = 0
    ) -> list[tuple[str, dict[str, Any]]]:
        """The ``(event, data)`` pairs of this reply, in the order they are sent.

        Args:
            model: The model to name when :attr:`model` is ``None``.
            message_id: The message's id.
            request: The request's number, used in generated tool-use ids.
        """
        events: list[tuple[str, dict[str, Any]]] = []
        stop_reason = self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")
        output_tokens = self._output_tokens()
        message = self._message(model, message_id, content=[], stop_reason=None)
        message["usage"]["output_tokens"] = min(1, output_tokens)
        events.append(("message_start", {"type": "message_start", "message": message}))
        events.append(("ping", {"type": "ping"}))
        index = 0
        if self.text:
            events.append(_block_start(index, {"type": "text", "text": ""}))
            for piece in self.text:
                delta = {"type": "text_delta", "text": piece}
                events.append(_block_delta(index, delta))
            events.append(_block_stop(index))
            index += 1
        for number, tool in enumerate(self.tool_uses):
            block = {
                "type": "tool_use",
                "id": _tool_id(tool, request, number),
                "name": tool.name,
                "input": {},
            }
            events.append(_block_start(index, block))
            for piece in tool.json_pieces():
                delta = {"type": "input_json_delta", "partial_json": piece}
                events.append(_block_delta(index, delta))
            events.append(_block_stop(index))
            index += 1
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        events.append(("message_delta", message_delta))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def message(
        self, *, model: str = "claude-test", message_id: str = "msg_test", request: int = 0
    ) -> dict[str, Any]:
        """The complete message object, as a non-streaming request receives it."""
        content: list[dict[str, Any]] = []
        if self.text:
            content.append({"type": "text", "text": "".join(self.text)})
        for number, tool in enumerate(self.tool_uses):
            block = {
                "type": "tool_use",
                "id": _tool_id(tool, request, number),
                "name": tool.name,
                "input": dict(tool.input),
            }
            content.append(block)
        stop_reason = self.stop_reason or ("tool_use" if self.tool_uses else "end_turn")
        message = self._message(model, message_id, content=content, stop_reason=stop_reason)
        message["usage"]["output_tokens"] = self._output_tokens()
        return message

    def _output_tokens(self) -> int:
        if self.output_tokens is not None:
            return self.output_tokens
        return max(1, len(self.text) + sum(len(t.json_pieces()) for t in self.tool_uses))

    def _message(
        self, model: str, message_id: str, *, content: list[dict[str, Any]], stop_reason: str | None
    ) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model or model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        }


def _tool_id(tool: ToolUse, request: int, number: int) -> str:
    return tool.id if tool.id is not None else f"toolu_test{request:04d}{number:02d}"


def _block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    data = {"type": "content_block_start", "index": index, "content_block": block}
    return ("content_block_start", data)


def _block_delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _block_stop(index: int) -> tuple[str, dict[str, Any]]:
    return ("content_block_stop", {"type": "content_block_stop", "index": index})


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorReply:
    """An API error: a JSON error body with an HTTP status.

    The body is ``{"type": "error", "error": {"type": error_type, "message":
    message}, "request_id": ...}``, as the API sends it.
    """

    status: int
    """The HTTP status: 400, 401, 403, 404, 429, 500, 529, ..."""
    error_type: str
    """``error.type``: ``invalid_request_error``, ``rate_limit_error``, ``overloaded_error``, ..."""
    message: str | None = None
    """``error.message``; a message like the API's for ``error_type`` when ``None``."""
    retry_after: float | None = None
    """Seconds to send in a ``retry-after`` header, if any."""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Further response headers (``x-should-retry``, ...)."""

    def body(self, request_id: str = "req_test") -> dict[str, Any]:
        """The JSON error body."""
        message = self.message
        if message is None:
            message = _DEFAULT_ERROR_MESSAGES.get(self.error_type, self.error_type)
        error = {"type": self.error_type, "message": message}
        return {"type": "error", "error": error, "request_id": request_id}


@dataclasses.dataclass(frozen=True, slots=True)
class DisconnectAfter:
    """Start streaming ``reply``, then close the connection after ``events`` events.

    The response ends without its terminating chunk, as when a connection
    drops mid-stream. With ``headers=False`` the server closes the connection
    without sending any response at all (``events`` is then ignored); with
    ``complete_body=True`` it ends the body cleanly instead, so the stream
    just stops early.
    """

    events: int
    """How many events of ``reply`` to send before closing."""
    reply: StreamedReply = StreamedReply(text=("Hello", " there", ", how", " are", " you?"))
    """The reply whose first events are sent."""
    headers: bool = True
    """Whether to send the status line and headers before closing."""
    complete_body: bool = False
    """End the HTTP body properly after the events instead of dropping the connection.

    The response is then well-formed but the message stops short of its
    ``message_stop`` event.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorEventAfter:
    """Stream the first ``events`` events of ``reply``, then an ``error`` event, then end.

    This is how the API reports a failure after the ``200`` status was sent
    (``overloaded_error`` mid-stream, for example).
    """

    events: int
    """How many events of ``reply`` to send before the error."""
    error_type: str = "overloaded_error"
    """``error.type`` of the ``error`` event."""
    message: str | None = None
    """``error.message``; a message like the API's when ``None``."""
    reply: StreamedReply = StreamedReply(text=("Hello", " there", ", how", " are", " you?"))
    """The reply whose first events are sent."""


Reply = StreamedReply | ErrorReply | DisconnectAfter | ErrorEventAfter
"""One scripted response."""


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
    reply: Reply | None
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
class AnthropicServerStatistics:
    """Counters of an :class:`AnthropicServer`, as returned by its ``statistics()``."""

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
    """Responses the server cut short on purpose (:class:`DisconnectAfter`), once sent."""
    script_remaining: int
    """Scripted replies not consumed yet."""
    unscripted: int
    """``/v1/messages`` requests that found the script exhausted."""


# -- the server -----------------------------------------------------------------


class _Names(TypedDict):
    model: str
    message_id: str
    request: int


@dataclasses.dataclass(slots=True)
class _Incoming:
    request: h11.Request
    body: bytes


class _ClientGone(Exception):
    """The client closed the connection while a response was being sent."""


class AnthropicServer:
    """An HTTP server that answers ``POST /v1/messages`` from a script.

    Create it with :func:`open_anthropic_server`, or run :meth:`serve` in a
    nursery of your own with ``await nursery.start(server.serve)``.

    Args:
        script: The replies, consumed one per ``POST /v1/messages`` request.
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.
    """

    def __init__(
        self, script: Iterable[Reply] = (), *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._script: deque[Reply] = deque(script)
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
        return f"<AnthropicServer {self._base_url or 'not started'}>"

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>``, the URL to give the SDK's ``base_url``.

        Raises:
            RuntimeError: the server is not serving yet.
        """
        if self._base_url is None:
            raise RuntimeError("the server is not serving yet: start it with nursery.start")
        return self._base_url

    def add(self, *replies: Reply) -> None:
        """Append ``replies`` to the script."""
        self._script.extend(replies)
        self._notify()

    def statistics(self) -> AnthropicServerStatistics:
        """The server's counters, as a frozen record."""
        return AnthropicServerStatistics(
            requests=len(self.requests),
            open_connections=self._open_connections,
            active_responses=self._active_responses,
            completed_responses=self._completed,
            disconnects=self._disconnects,
            dropped=self._dropped,
            script_remaining=len(self._script),
            unscripted=self._unscripted,
        )

    async def wait_until(
        self, predicate: Callable[[AnthropicServerStatistics], bool]
    ) -> AnthropicServerStatistics:
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

        def record(reply: Reply | None, *, unscripted: bool = False) -> None:
            self.requests.append(
                RecordedRequest(method, path, headers, body, now, reply, unscripted)
            )
            self._notify()

        if path != "/v1/messages":
            record(None)
            error = ErrorReply(404, "not_found_error", f"Not found: {method} {path}")
            await self._send_error(stream, conn, error)
            return True
        if method != "POST":
            record(None)
            error = ErrorReply(405, "invalid_request_error", f"Method not allowed: {method}")
            await self._send_error(stream, conn, error)
            return True
        if not valid_json or not isinstance(body, dict):
            record(None)
            error = ErrorReply(400, "invalid_request_error", "The request body is not valid JSON.")
            await self._send_error(stream, conn, error)
            return True
        if not self._script:
            self._unscripted += 1
            record(None, unscripted=True)
            message = (
                f"trioflow test server: script exhausted; request {len(self.requests)} "
                "had no scripted reply"
            )
            await self._send_error(stream, conn, ErrorReply(500, "api_error", message))
            return True

        reply = self._script.popleft()
        record(reply)
        number = len(self.requests)
        if isinstance(reply, ErrorReply):
            await self._send_error(stream, conn, reply)
            return True
        model = body.get("model")
        names: _Names = {
            "model": model if isinstance(model, str) else "claude-test",
            "message_id": f"msg_test{number:06d}",
            "request": number,
        }
        streamed = reply if isinstance(reply, StreamedReply) else reply.reply
        if isinstance(reply, DisconnectAfter) and not reply.headers:
            self._count_dropped()
            return False
        if body.get("stream") is not True:
            if not isinstance(reply, StreamedReply):
                self._count_dropped()
                return False
            payload = json.dumps(streamed.message(**names)).encode()
            await self._send_whole(stream, conn, 200, "application/json", payload, (), number)
            return True
        frames = streamed.sse_frames(**names)
        cut = False
        if isinstance(reply, DisconnectAfter):
            frames = frames[: max(0, reply.events)]
            cut = True
        elif isinstance(reply, ErrorEventAfter):
            frames = frames[: max(0, reply.events)]
            error_body = ErrorReply(0, reply.error_type, reply.message).body()
            frames.append(encode_sse("error", {"type": "error", "error": error_body["error"]}))
        complete = not cut or (isinstance(reply, DisconnectAfter) and reply.complete_body)
        await self._send_stream(
            stream, conn, streamed, frames, number=number, end=complete, cut=cut
        )
        return complete

    def _count_dropped(self) -> None:
        self._dropped += 1
        self._notify()

    def _headers(self, content_type: str, number: int) -> list[tuple[str, str]]:
        return [
            ("date", email.utils.formatdate(usegmt=True)),
            ("content-type", content_type),
            ("request-id", _request_id(number)),
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

    async def _send_error(
        self, stream: trio.SocketStream, conn: h11.Connection, error: ErrorReply
    ) -> None:
        number = len(self.requests)
        payload = json.dumps(error.body(_request_id(number))).encode()
        extra = list(error.headers.items())
        if error.retry_after is not None:
            value = error.retry_after
            extra.append(("retry-after", str(int(value)) if value == int(value) else str(value)))
        await self._send_whole(
            stream, conn, error.status, "application/json", payload, extra, number
        )

    async def _send_stream(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        reply: StreamedReply,
        frames: list[bytes],
        *,
        number: int,
        end: bool,
        cut: bool,
    ) -> None:
        """Send the frames, paced and gated; end the body if ``end``; count a ``cut`` as dropped.

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
                        if reply.gate is not None and index == reply.gate_after:
                            await reply.gate.wait()
                        if reply.pace:
                            await trio.sleep(reply.pace)
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


def _request_id(number: int) -> str:
    return f"req_test{number:06d}"


@asynccontextmanager
async def open_anthropic_server(
    script: Iterable[Reply] = (), *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[AnthropicServer]:
    """Run an :class:`AnthropicServer` for the duration of the ``async with`` block.

    Args:
        script: The replies, consumed one per ``POST /v1/messages`` request.
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.

    Yields:
        The serving server; :attr:`AnthropicServer.base_url` is ready.

    Raises:
        OSError: the address could not be bound.

    Cancellation:
        Leaving the block, normally or not, stops the server and closes its
        connections.
    """
    server = AnthropicServer(script, host=host, port=port)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
