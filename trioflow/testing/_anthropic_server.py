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
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypedDict

import h11
import trio

from trioflow.sse import encode
from trioflow.testing._scripted_server import (
    RecordedRequest,
    ScriptedServer,
    ServerStatistics,
    ToolUse,
    serving,
)

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


AnthropicServerStatistics = ServerStatistics
"""The counters of an :class:`AnthropicServer` (the :class:`ServerStatistics` of every test server)."""


# -- the server -----------------------------------------------------------------


class _Names(TypedDict):
    model: str
    message_id: str
    request: int


class AnthropicServer(ScriptedServer[Reply]):
    """An HTTP server that answers ``POST /v1/messages`` from a script.

    Create it with :func:`open_anthropic_server`, or run :meth:`serve` in a
    nursery of your own with ``await nursery.start(server.serve)``.

    Args:
        script: The replies, consumed one per ``POST /v1/messages`` request.
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.
    """

    path = "/v1/messages"
    request_id_header = "request-id"

    async def _answer(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        reply: Reply,
        body: dict[str, Any],
        number: int,
    ) -> bool:
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
        if isinstance(reply, DisconnectAfter):
            return await self._stream_reply(
                stream,
                conn,
                frames,
                streamed,
                number=number,
                keep=reply.events,
                complete_body=reply.complete_body,
            )
        if isinstance(reply, ErrorEventAfter):
            error = ErrorReply(0, reply.error_type, reply.message).body()["error"]
            tail = encode_sse("error", {"type": "error", "error": error})
            return await self._stream_reply(
                stream, conn, frames, streamed, number=number, keep=reply.events, tail=tail
            )
        return await self._stream_reply(stream, conn, frames, streamed, number=number)

    async def _send_plain_error(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, message: str
    ) -> None:
        error_type = _PLAIN_ERROR_TYPES.get(status, "api_error")
        await self._send_error(stream, conn, ErrorReply(status, error_type, message))

    async def _send_error(
        self, stream: trio.SocketStream, conn: h11.Connection, error: ErrorReply
    ) -> None:
        body = error.body(self._request_id(len(self.requests)))
        await self._send_json_error(
            stream, conn, error.status, body, error.headers, error.retry_after
        )


_PLAIN_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
}


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
    async with serving(AnthropicServer(script, host=host, port=port)) as server:
        yield server
