"""Claude through the official ``anthropic`` SDK: :class:`AnthropicModel`.

:class:`AnthropicModel` implements :class:`~trioflow.models.Model` on the
streaming Messages API. It runs the SDK's async client under Trio (the SDK's
HTTP stack is built on anyio, which supports Trio), turns each streamed text
delta into a :class:`~trioflow.models.TextDelta` as it arrives, each
``tool_use`` block into one :class:`~trioflow.models.ToolCall` when the block
is complete, and ends every turn with a :class:`~trioflow.models.TurnEnd`.

Retries are trioflow's, not the SDK's (the SDK client is made with
``max_retries=0``): a failed attempt that is worth retrying becomes a
:class:`~trioflow.models.RetryNotice`, yielded before the backoff sleep, so
that the agent loop can report it. Retried: rate limits (``429``, honouring
``retry-after`` up to the policy's
:attr:`~trioflow.RetryPolicy.max_retry_after`), overload (``529`` /
``overloaded_error``), server errors (``5xx``, ``408``), timeouts,
connection errors, streams that break off before ``message_stop``
(including an ``error`` event mid-stream) and streams that carry invalid
data (a ``data:`` field that is not a JSON object, bytes that are not
UTF-8). Not retried: other client errors (``400``, ``401``, ``403``,
``404``, ...), a ``retry-after`` longer than ``max_retry_after``, and a
tool call whose input is not a JSON object.

The request goes through the SDK (``client.messages.create(stream=True)``:
headers, authentication, error statuses as SDK exceptions); the
Server-Sent Events of the body are decoded by trioflow (by
:class:`trioflow.sse.SSEDecoder`), from the SDK's HTTP response, because the
SDK's event iterator leaves its async generators suspended when it raises
for an ``error`` event or its consumer stops early, and Trio warns
(``ResourceWarning``) when the garbage collector finds them.

The API key never appears in an event, an exception message or a ``repr``.

All of this but the Messages API's wire format is shared with
:class:`~trioflow.models.OpenAIModel`, in ``trioflow.models._sdk``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

import anthropic
import httpx2

from trioflow._json import loads as _loads
from trioflow.models._base import (
    Message,
    ModelError,
    ModelEvent,
    StopReason,
    TextDelta,
    ToolInputDelta,
    ToolSpec,
    TurnEnd,
    Usage,
)
from trioflow.models._sdk import (
    InvalidDataMixin,
    SDKDialect,
    SDKModel,
    StreamParser,
    tool_call,
)
from trioflow.sse import ServerSentEvent
from trioflow.supervise import RetryPolicy

__all__ = ["DEFAULT_CLAUDE_MODEL", "DEFAULT_CLAUDE_RETRY", "AnthropicModel"]

DEFAULT_CLAUDE_MODEL: Final = "claude-sonnet-5-5"
"""The model :class:`AnthropicModel` uses unless told otherwise."""

DEFAULT_CLAUDE_RETRY: Final = RetryPolicy(attempts=4, base_delay=0.5)
"""The retry policy of :class:`AnthropicModel` by default: 4 attempts, after 0.5 s, 1 s, 2 s."""

_RETRYABLE_KINDS_BY_ERROR_TYPE: Mapping[str, str] = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate_limit",
    "api_error": "server_error",
    "timeout_error": "timeout",
}


class AnthropicModel(SDKModel):
    """Claude, through the official ``anthropic`` SDK, as a :class:`~trioflow.models.Model`.

    Use it as an async context manager, which closes its HTTP client on exit
    (or call :meth:`aclose`)::

        async with AnthropicModel("claude-sonnet-5-5") as model:
            async with model.stream([Message.user("Hi")]) as events:
                async for event in events:
                    ...

    Args:
        model: The Claude model to call.
        api_key: The API key; ``$ANTHROPIC_API_KEY`` when ``None``. Ignored
            when ``client`` is given.
        base_url: The API's URL; the SDK's default (``$ANTHROPIC_BASE_URL``
            or ``https://api.anthropic.com``) when ``None``. Ignored when
            ``client`` is given.
        max_tokens: The most tokens one turn may generate.
        retry: How often and after which delays to retry a failed request;
            :data:`DEFAULT_CLAUDE_RETRY` when ``None``. Only failures of a
            retryable kind are retried, and only if ``retry.should_retry``
            accepts the SDK exception behind them
            (:class:`anthropic.RateLimitError`,
            :class:`anthropic.OverloadedError`,
            :class:`anthropic.InternalServerError`,
            :class:`anthropic.APIConnectionError` also for a stream cut
            short, :class:`anthropic.APITimeoutError`,
            :class:`anthropic.APIStatusError` for an ``error`` event
            mid-stream, or :class:`anthropic.APIResponseValidationError`
            for invalid data in the stream), so ``retry_on`` can narrow them
            down. A server's ``retry-after`` longer than the backoff
            replaces it, up to ``retry.max_retry_after``; a longer one fails
            the request at once with a :class:`~trioflow.models.ModelError`
            instead of sleeping.
        timeout: Seconds the SDK waits for the server (per read, connect,
            ...); ``None`` for no timeout. Ignored when ``client`` is given.
        client: An SDK client to use instead of a new one. The model uses a
            copy with the SDK's own retries turned off, and does not close
            it: its owner does.

    Raises:
        ModelError: ``kind="authentication"``: no ``client`` was given and no
            API key either, as an argument or in ``$ANTHROPIC_API_KEY``. The
            check happens here, at construction, not at the first request.
    """

    def __init__(
        self,
        model: str = DEFAULT_CLAUDE_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = 1024,
        retry: RetryPolicy | None = None,
        timeout: float | None = 600.0,
        client: anthropic.AsyncAnthropic | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {max_tokens!r}")
        if client is None:
            key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY")
            if not key:
                raise ModelError(
                    "no Anthropic API key: pass api_key=... or set ANTHROPIC_API_KEY",
                    kind="authentication",
                )
            # Our own HTTP client, not the SDK's default wrapper, whose
            # finalizer reaches for a running asyncio loop.
            self._client: anthropic.AsyncAnthropic = anthropic.AsyncAnthropic(
                api_key=key,
                base_url=base_url,
                max_retries=0,
                timeout=timeout,
                http_client=anthropic.DefaultAsyncHttpxClient(),
            )
        else:
            self._client = client.with_options(max_retries=0)
        self._setup(
            model,
            max_tokens=max_tokens,
            retry=retry if retry is not None else DEFAULT_CLAUDE_RETRY,
            owns_client=client is None,
            credentials=(self._client.api_key, self._client.auth_token),
        )

    # -- what SDKModel asks of its subclasses ----------------------------------------

    def _params(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], system: str | None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self._model,
            "max_tokens": self._max_tokens,
            "messages": [m.to_dict() for m in messages],
        }
        if tools:
            params["tools"] = [t.to_dict() for t in tools]
        if system is not None:
            params["system"] = system
        return params

    async def _open(self, params: dict[str, Any]) -> httpx2.Response:
        stream: anthropic.AsyncStream[Any]
        stream = await self._client.messages.create(**params, stream=True)
        return stream.response

    def _parser(self, response: httpx2.Response) -> StreamParser:
        return _MessagesParser(response)


class _MessagesParser(StreamParser):
    """Reads the Messages API's event stream: one attempt's state.

    The SDK's own event iterator is not used: it leaves its chain of async
    generators suspended when it raises for an ``error`` event or when its
    consumer stops early, and Trio warns when the garbage collector finds them.
    """

    end_marker = "message_stop event"

    def __init__(self, response: httpx2.Response) -> None:
        super().__init__(response)
        self._stop_reason: str | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._tools: dict[int, tuple[str, str, list[str], dict[str, Any]]] = {}

    def data(self, frame: ServerSentEvent) -> dict[str, Any] | None:
        name, text = frame.event, frame.data
        if name == "ping":
            return None
        try:
            data = _loads(text)
        except ValueError as exc:
            if name != "error":
                raise InvalidStreamData(
                    self.response, f"the data of a {name!r} event is not JSON ({exc})", text
                ) from None
            data = text
        if name == "error" or (isinstance(data, dict) and data.get("type") == "error"):
            body = data if isinstance(data, dict) else {"error": {"message": text}}
            raise anthropic.APIStatusError(f"{body}", response=self.response, body=body)
        if not isinstance(data, dict):
            raise InvalidStreamData(
                self.response, f"the data of a {name!r} event is not a JSON object", text
            )
        return data

    def handle(self, data: dict[str, Any]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        try:
            etype = data.get("type")
            if etype == "content_block_delta":
                delta = data["delta"]
                if delta["type"] == "text_delta":
                    if delta["text"]:
                        events.append(TextDelta(str(delta["text"])))
                elif delta["type"] == "input_json_delta" and data["index"] in self._tools:
                    index = data["index"]
                    call_id, name, pieces, _ = self._tools[index]
                    piece = str(delta["partial_json"])
                    pieces.append(piece)
                    if piece:
                        events.append(ToolInputDelta(call_id, name, piece, index))
            elif etype == "content_block_start":
                block = data["content_block"]
                if block["type"] == "tool_use":
                    initial = block.get("input")
                    initial = dict(initial) if isinstance(initial, Mapping) else {}
                    index = data["index"]
                    call_id, name = str(block["id"]), str(block["name"])
                    self._tools[index] = (call_id, name, [], initial)
                    events.append(ToolInputDelta(call_id, name, "", index, first=True))
            elif etype == "content_block_stop":
                if data["index"] in self._tools:
                    index = data["index"]
                    call_id, name, pieces, initial = self._tools.pop(index)
                    text = "".join(pieces)
                    if not text.strip() and initial:
                        # The input came whole with the block's start: stream it as one piece.
                        events.append(ToolInputDelta(call_id, name, json.dumps(initial), index))
                    events.append(tool_call(call_id, name, text, initial))
            elif etype == "message_start":
                usage = data["message"].get("usage") or {}
                self._input_tokens = int(usage.get("input_tokens") or 0)
                self._output_tokens = int(usage.get("output_tokens") or 0)
            elif etype == "message_delta":
                self._stop_reason = data["delta"].get("stop_reason")
                usage = data.get("usage") or {}
                if usage.get("output_tokens") is not None:
                    self._output_tokens = int(usage["output_tokens"])
                if usage.get("input_tokens") is not None:
                    self._input_tokens = int(usage["input_tokens"])
            elif etype == "message_stop":
                self.finished = True
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelError(
                f"malformed {data.get('type')!r} event in the stream: {type(exc).__name__}: {exc}",
                kind="invalid_response",
            ) from None
        return events

    def turn_end(self) -> TurnEnd:
        reason: StopReason | str
        try:
            reason = StopReason(self._stop_reason or StopReason.END_TURN)
        except ValueError:
            reason = str(self._stop_reason)
        return TurnEnd(reason, Usage(self._input_tokens, self._output_tokens))


# -- errors ---------------------------------------------------------------------


class InvalidStreamData(InvalidDataMixin, anthropic.APIResponseValidationError):
    """Invalid data in the Messages API's event stream (see :class:`~trioflow.models._sdk.InvalidDataMixin`).

    Args:
        response: The attempt's HTTP response.
        what: What is wrong, for the message.
        data: The offending data, quoted (shortened) in the message.
    """


AnthropicModel._dialect = SDKDialect(
    anthropic,
    label="Claude",
    invalid_data=InvalidStreamData,
    request_id_header="request-id",
    nested_error=True,  # {"type": "error", "error": {"type", "message"}}
    retryable_kinds_by_error_type=_RETRYABLE_KINDS_BY_ERROR_TYPE,
)
