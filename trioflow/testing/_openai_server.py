"""A local HTTP server that speaks the OpenAI Chat Completions streaming protocol, for tests.

Tests drive the real ``openai`` SDK (and :class:`~trioflow.models.OpenAIModel`)
over real HTTP against this server on ``127.0.0.1``: nothing of the SDK or of
its HTTP client is mocked. It plays the part of OpenAI or of any compatible
server (vLLM, Ollama, LM Studio, ...). Like the Anthropic one, it plays a
*script*, a list of replies consumed one per ``POST /v1/chat/completions``:

- :class:`ChatReply`: a completion streamed as ``chat.completion.chunk``
  objects, one ``data:`` line each, then ``data: [DONE]``: text deltas, tool
  calls whose ``function.arguments`` arrive in pieces (several calls in one
  reply, told apart by their ``index``, one after the other or interleaved),
  a ``finish_reason`` and, when the request asks for it with
  ``stream_options: {"include_usage": true}``, a last chunk with the usage;
- :class:`ChatError`: an API error (``429`` or ``5xx`` with a
  ``retry-after`` header, ``401`` with its JSON error body, ``404`` for an
  unknown model, ...);
- :class:`ChatDisconnectAfter`: the first chunks of a streamed reply, then the
  connection is closed before ``[DONE]``;
- :class:`ChatErrorAfter`: the first chunks, then an ``{"error": ...}`` chunk,
  as servers report a failure after the ``200`` status.

A reply may be paced or held at a gate, and carry raw bytes (a ``data:``
line that is not JSON, bytes that are not UTF-8), as with
:class:`~trioflow.testing.StreamedReply`. The server records every request
(:attr:`~trioflow.testing.ScriptedServer.requests`: the messages with tool
results, the tools, the model, ``stream_options`` the SDK sent) and counts
connections and responses the client closed early::

    script = [ChatError(429, retry_after=2), ChatReply(text=["Hi"])]
    async with open_openai_server(script) as server:
        client = openai.AsyncOpenAI(api_key="test", base_url=server.base_url + "/v1")
        ...

A request without ``"stream": true`` gets a ``400``: the server streams only.
Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with an
``x-request-id`` header, as OpenAI sends them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import h11
import trio

from trioflow.sse import encode
from trioflow.testing._scripted_server import ScriptedServer, ToolUse, serving

__all__ = [
    "DONE_FRAME",
    "ChatDisconnectAfter",
    "ChatError",
    "ChatErrorAfter",
    "ChatReply",
    "OpenAIReply",
    "OpenAIServer",
    "encode_chunk",
    "open_openai_server",
]

DONE_FRAME: Final = b"data: [DONE]\n\n"
"""The frame that ends a Chat Completions stream."""

_ERRORS: Mapping[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    405: ("invalid_request_error", None, "Method not allowed."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def encode_chunk(data: Mapping[str, Any]) -> bytes:
    """Encode one chunk as a ``data:`` line of compact JSON and a blank line, in UTF-8."""
    return encode(json.dumps(data, separators=(",", ":"), ensure_ascii=False)).encode()


# -- the script -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ChatReply:
    """A completion streamed as the Chat Completions API streams it.

    The chunks, in order: one with ``delta.role``, one per item of ``text``
    (``delta.content``), then the tool calls' chunks (each call's first chunk
    with its id and name, then its argument pieces; call after call, or
    round-robin when :attr:`interleave`), one with the ``finish_reason``
    (``delta`` empty) and, when the request asked for usage, one with
    ``choices`` empty and the ``usage``. :meth:`chunks` lists them, so a test
    can count where to cut or hold the stream; ``data: [DONE]`` follows them.

    Raises:
        ValueError: an index of :attr:`raw` is negative.
    """

    text: Sequence[str] = ()
    """The text deltas, in order."""
    tool_calls: Sequence[ToolUse] = ()
    """The tool calls, after the text (parallel calls: several)."""
    finish_reason: str | None = None
    """The finish reason; when ``None``: ``"tool_calls"`` with tool calls, else ``"stop"``."""
    interleave: bool = False
    """Send the tool calls' chunks round-robin, one call's piece after another's."""
    prompt_tokens: int = 25
    """``usage.prompt_tokens``."""
    completion_tokens: int | None = None
    """``usage.completion_tokens``; one per content or argument chunk when ``None``."""
    model: str | None = None
    """The model named in the chunks; the requested model when ``None``."""
    pace: float = 0.0
    """Seconds to :func:`trio.sleep` before each chunk (on Trio's clock)."""
    gate: trio.Event | None = None
    """When set, the server sends ``gate_after`` chunks, then waits for this event."""
    gate_after: int = 0
    """How many chunks to send before waiting for ``gate``."""
    raw: Sequence[tuple[int, bytes]] = ()
    """Verbatim bytes to send before chunk number ``index`` (0-based, as
    listed by :meth:`chunks`; an index past the last chunk sends them before
    ``[DONE]``), as ``(index, bytes)`` pairs. Write the whole frame, its
    ending blank line included."""

    def __post_init__(self) -> None:
        for index, _ in self.raw:
            if index < 0:
                raise ValueError(f"raw indexes must be >= 0, not {index!r}")

    def chunks(
        self,
        *,
        model: str = "gpt-test",
        completion_id: str = "chatcmpl-test",
        request: int = 0,
        include_usage: bool = True,
    ) -> list[dict[str, Any]]:
        """The ``chat.completion.chunk`` objects of this reply, in the order they are sent.

        Args:
            model: The model to name when :attr:`model` is ``None``.
            completion_id: The completion's id.
            request: The request's number, used in generated tool call ids.
            include_usage: Whether to end with the usage chunk.
        """
        name = self.model or model

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": name,
                "system_fingerprint": "fp_test",
                "choices": [choice],
            }

        out = [chunk({"role": "assistant", "content": ""})]
        out.extend(chunk({"content": piece}) for piece in self.text)
        calls: list[list[dict[str, Any]]] = []
        for index, call in enumerate(self.tool_calls):
            call_id = call.id if call.id is not None else f"call_test{request:04d}{index:02d}"
            first = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            rest = [{"index": index, "function": {"arguments": p}} for p in call.json_pieces()]
            calls.append([first, *rest])
        if self.interleave:
            order = [
                pieces[i]
                for i in range(max(map(len, calls), default=0))
                for pieces in calls
                if i < len(pieces)
            ]
        else:
            order = [piece for pieces in calls for piece in pieces]
        out.extend(chunk({"tool_calls": [piece]}) for piece in order)
        reason = self.finish_reason or ("tool_calls" if self.tool_calls else "stop")
        out.append(chunk({}, reason))
        if include_usage:
            completion = self.completion_tokens
            if completion is None:
                completion = max(
                    1, len(self.text) + sum(len(c.json_pieces()) for c in self.tool_calls)
                )
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
            }
            last = chunk({})
            last["choices"] = []
            last["usage"] = usage
            out.append(last)
        return out

    def frames(self, **names: Any) -> list[bytes]:
        """The bytes sent for each chunk of :meth:`chunks` (same arguments), then ``[DONE]``.

        :attr:`raw` bytes are prepended to the frame of their index; past the
        last chunk, to the ``[DONE]`` frame.
        """
        frames = [encode_chunk(c) for c in self.chunks(**names)]
        frames.append(DONE_FRAME)
        for index, data in self.raw:
            position = min(index, len(frames) - 1)
            frames[position] = data + frames[position]
        return frames


@dataclasses.dataclass(frozen=True, slots=True)
class ChatError:
    """An API error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

    ``type``, ``code`` and ``message`` default to what OpenAI sends for the
    status (``429``: ``requests`` / ``rate_limit_exceeded``; ``404``:
    ``invalid_request_error`` / ``model_not_found``, naming the requested
    model; ``5xx``: ``server_error``; ...).
    """

    status: int
    """The HTTP status: 400, 401, 403, 404, 429, 500, 503, ..."""
    message: str | None = None
    """``error.message``; OpenAI's for the status when ``None``."""
    type: str | None = None
    """``error.type``; OpenAI's for the status when ``None``."""
    code: str | None = None
    """``error.code``; OpenAI's for the status when ``None``."""
    retry_after: float | None = None
    """Seconds to send in a ``retry-after`` header, if any."""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Further response headers."""

    def body(self, model: str | None = None) -> dict[str, Any]:
        """The JSON error body (a ``404``'s default message names ``model``)."""
        default_type, default_code, default_message = _ERRORS.get(
            self.status,
            ("server_error" if self.status >= 500 else "invalid_request_error", None, "Error."),
        )
        message = self.message
        if message is None:
            message = default_message
            if self.status == 404 and model:
                message = f"The model `{model}` does not exist or you do not have access to it."
        error = {
            "message": message,
            "type": self.type or default_type,
            "param": None,
            "code": self.code or default_code,
        }
        return {"error": error}


@dataclasses.dataclass(frozen=True, slots=True)
class ChatDisconnectAfter:
    """Start streaming ``reply``, then close the connection after ``chunks`` chunks.

    The response ends without ``[DONE]`` and without its terminating HTTP
    chunk, as when a connection drops mid-stream. With ``headers=False`` the
    server closes the connection without any response (``chunks`` is then
    ignored); with ``complete_body=True`` it ends the body cleanly instead,
    so the stream just stops before ``[DONE]``.
    """

    chunks: int
    """How many chunks of ``reply`` to send before closing."""
    reply: ChatReply = ChatReply(text=("Hello", " there", ", how", " are", " you?"))
    """The reply whose first chunks are sent."""
    headers: bool = True
    """Whether to send the status line and headers before closing."""
    complete_body: bool = False
    """End the HTTP body properly after the chunks instead of dropping the connection."""


@dataclasses.dataclass(frozen=True, slots=True)
class ChatErrorAfter:
    """Stream the first ``chunks`` chunks of ``reply``, then an ``{"error": ...}`` chunk, then end."""

    chunks: int
    """How many chunks of ``reply`` to send before the error."""
    message: str = "The server had an error while processing your request."
    """``error.message``."""
    type: str = "server_error"
    """``error.type``."""
    code: str | int | None = None
    """``error.code`` (vLLM sends the HTTP status the error stands for, ``400``)."""
    reply: ChatReply = ChatReply(text=("Hello", " there", ", how", " are", " you?"))
    """The reply whose first chunks are sent."""


OpenAIReply = ChatReply | ChatError | ChatDisconnectAfter | ChatErrorAfter
"""One scripted response of an :class:`OpenAIServer`."""


# -- the server -----------------------------------------------------------------


class OpenAIServer(ScriptedServer[OpenAIReply]):
    """An HTTP server that answers ``POST /v1/chat/completions`` from a script.

    Give the SDK ``base_url=server.base_url + "/v1"`` (:attr:`api_url`).
    Create it with :func:`open_openai_server`, or run :meth:`serve` in a
    nursery of your own with ``await nursery.start(server.serve)``.

    Args:
        script: The replies, consumed one per ``POST /v1/chat/completions`` request.
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.
    """

    path = "/v1/chat/completions"
    request_id_header = "x-request-id"

    @property
    def api_url(self) -> str:
        """``http://<host>:<port>/v1``, the URL to give the SDK's (or a model's) ``base_url``.

        Raises:
            RuntimeError: the server is not serving yet.
        """
        return self.base_url + "/v1"

    async def _answer(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        reply: OpenAIReply,
        body: dict[str, Any],
        number: int,
    ) -> bool:
        model = body.get("model")
        model_name = model if isinstance(model, str) else "gpt-test"
        if isinstance(reply, ChatError):
            await self._send_error(stream, conn, reply, model_name)
            return True
        if isinstance(reply, ChatDisconnectAfter) and not reply.headers:
            self._count_dropped()
            return False
        if body.get("stream") is not True:
            message = "trioflow test server: only streamed requests (stream: true) are served"
            await self._send_error(stream, conn, ChatError(400, message), model_name)
            return True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        streamed = reply if isinstance(reply, ChatReply) else reply.reply
        frames = streamed.frames(
            model=model_name,
            completion_id=f"chatcmpl-test{number:06d}",
            request=number,
            include_usage=include_usage,
        )
        if isinstance(reply, ChatDisconnectAfter):
            return await self._stream_reply(
                stream,
                conn,
                frames,
                streamed,
                number=number,
                keep=reply.chunks,
                complete_body=reply.complete_body,
            )
        if isinstance(reply, ChatErrorAfter):
            error = {
                "message": reply.message,
                "type": reply.type,
                "param": None,
                "code": reply.code,
            }
            tail = encode_chunk({"error": error})
            return await self._stream_reply(
                stream, conn, frames, streamed, number=number, keep=reply.chunks, tail=tail
            )
        return await self._stream_reply(stream, conn, frames, streamed, number=number)

    async def _send_plain_error(
        self, stream: trio.SocketStream, conn: h11.Connection, status: int, message: str
    ) -> None:
        await self._send_error(stream, conn, ChatError(status, message), None)

    async def _send_error(
        self, stream: trio.SocketStream, conn: h11.Connection, error: ChatError, model: str | None
    ) -> None:
        await self._send_json_error(
            stream, conn, error.status, error.body(model), error.headers, error.retry_after
        )


@asynccontextmanager
async def open_openai_server(
    script: Iterable[OpenAIReply] = (), *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[OpenAIServer]:
    """Run an :class:`OpenAIServer` for the duration of the ``async with`` block.

    Args:
        script: The replies, consumed one per ``POST /v1/chat/completions`` request.
        host: The address to listen on.
        port: The port to listen on; 0 picks a free one.

    Yields:
        The serving server; :attr:`OpenAIServer.api_url` is ready.

    Raises:
        OSError: the address could not be bound.

    Cancellation:
        Leaving the block, normally or not, stops the server and closes its
        connections.
    """
    async with serving(OpenAIServer(script, host=host, port=port)) as server:
        yield server
