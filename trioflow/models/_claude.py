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
Server-Sent Events of the body are decoded here (by
:class:`trioflow.sse.SSEDecoder`), from the SDK's HTTP response, because the SDK's event iterator leaves its async generators
suspended when it raises for an ``error`` event or its consumer stops early,
and Trio warns (``ResourceWarning``) when the garbage collector finds them.

The API key never appears in an event, an exception message or a ``repr``.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Final, Self

import anthropic
import trio
from anthropic.types import RawMessageStreamEvent

from trioflow._json import loads as _loads
from trioflow.models._base import (
    Message,
    ModelError,
    ModelEvent,
    RetryNotice,
    StopReason,
    TextDelta,
    ToolCall,
    ToolSpec,
    TurnEnd,
    Usage,
)
from trioflow.sse import ServerSentEvent, SSEDecoder
from trioflow.supervise import RetryPolicy

try:  # anthropic >= 2 is built on httpx2
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - older SDKs use httpx
    import httpx as _httpx  # type: ignore[no-redef]

__all__ = ["DEFAULT_CLAUDE_MODEL", "DEFAULT_CLAUDE_RETRY", "AnthropicModel"]

DEFAULT_CLAUDE_MODEL: Final = "claude-sonnet-5-5"
"""The model :class:`AnthropicModel` uses unless told otherwise."""

DEFAULT_CLAUDE_RETRY: Final = RetryPolicy(attempts=4, base_delay=0.5)
"""The retry policy of :class:`AnthropicModel` by default: 4 attempts, after 0.5 s, 1 s, 2 s."""

_CLOSE_TIMEOUT = 5.0
"""Seconds a shielded close of an HTTP response may take."""

_MIN_SECRET = 8
"""Credentials at least this long are scrubbed from messages."""

_KINDS_BY_STATUS: Mapping[int, str] = {
    400: "bad_request",
    401: "authentication",
    402: "billing",
    403: "permission",
    404: "not_found",
    409: "conflict",
    413: "request_too_large",
    422: "bad_request",
}

_RETRYABLE_KINDS_BY_ERROR_TYPE: Mapping[str, str] = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate_limit",
    "api_error": "server_error",
    "timeout_error": "timeout",
}


class AnthropicModel:
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
        self._model = model
        self._max_tokens = max_tokens
        self._retry = retry if retry is not None else DEFAULT_CLAUDE_RETRY
        self._closed = False
        if client is None:
            key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY")
            if not key:
                raise ModelError(
                    "no Anthropic API key: pass api_key=... or set ANTHROPIC_API_KEY",
                    kind="authentication",
                )
            # Our own HTTP client, not the SDK's default wrapper, whose
            # finalizer reaches for a running asyncio loop.
            self._client = anthropic.AsyncAnthropic(
                api_key=key,
                base_url=base_url,
                max_retries=0,
                timeout=timeout,
                http_client=anthropic.DefaultAsyncHttpxClient(),
            )
            self._owns_client = True
        else:
            self._client = client.with_options(max_retries=0)
            self._owns_client = False
        # Credentials to scrub from any text we produce (a server may echo a
        # key in an error message). Too short a string would mangle the text
        # and cannot be a real key.
        credentials = (self._client.api_key, self._client.auth_token)
        self._secrets = tuple(c for c in credentials if c and len(c) >= _MIN_SECRET)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<AnthropicModel {self._model!r} base_url={str(self._client.base_url)!r} "
            f"max_tokens={self._max_tokens}{state}>"
        )

    @property
    def name(self) -> str:
        """The Claude model's name, as passed to the API."""
        return self._model

    @property
    def retry_policy(self) -> RetryPolicy:
        """The policy by which failed requests are retried."""
        return self._retry

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client (unless it was given to the constructor); idempotent.

        Later :meth:`stream` calls raise :class:`trio.ClosedResourceError`.

        Cancellation:
            The close is shielded from cancellation (with a short timeout of
            its own), so the connections are released even when cancelled.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                await self._client.close()

    def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        """Stream one turn of Claude's reply to ``messages``.

        The ``async with`` block yields an async iterator of
        :data:`~trioflow.models.ModelEvent`: :class:`~trioflow.models.TextDelta`
        as text arrives, one :class:`~trioflow.models.ToolCall` per complete
        ``tool_use`` block, a :class:`~trioflow.models.RetryNotice` before
        each retry, and one :class:`~trioflow.models.TurnEnd` last. The
        request is sent at the first iteration. After a
        :class:`~trioflow.models.RetryNotice`, the next iteration sleeps the
        notice's delay (on Trio's clock), then streams the turn again from its
        start: the events of the failed attempt are void.

        Args:
            messages: The conversation so far.
            tools: The tools Claude may call.
            system: The system prompt, if any.

        Returns:
            An async context manager; leaving it closes the HTTP response.

        Raises:
            ModelError: On iteration, when the request failed for good:
                ``kind`` is ``"bad_request"`` (400), ``"authentication"``
                (401), ``"permission"`` (403), ``"not_found"`` (404), ... at
                once; or, with ``retryable=True``, ``"rate_limit"``,
                ``"overloaded"``, ``"server_error"``, ``"timeout"``,
                ``"connection"`` or ``"invalid_response"`` (a ``data:`` field
                that is not a JSON object, or bytes that are not UTF-8) once
                the retry policy's attempts are spent (or at once if its
                ``retry_on`` refuses the failure); at once, with
                ``retryable=True`` and :attr:`~trioflow.models.ModelError.retry_after`
                set, when the server asks to wait longer than the policy's
                ``max_retry_after`` (the message gives the hint and the
                cap); or ``"invalid_response"``, not retried, if a tool's
                input is not a JSON object or an event is malformed. The
                message names the error type, the API's message and the
                request id.
            trio.ClosedResourceError: On entry, if the model was closed; on
                iteration, if the block was left.
            trio.BusyResourceError: Two tasks iterate at once.

        Cancellation:
            Cancelling the iterating task closes the HTTP response (shielded,
            with a short timeout) when the ``async with`` block exits, so the
            server sees the connection close at once. Cancelled during a
            backoff sleep, no further attempt is made.
        """
        params: dict[str, Any] = {
            "model": self._model,
            "max_tokens": self._max_tokens,
            "messages": [m.to_dict() for m in messages],
        }
        if tools:
            params["tools"] = [t.to_dict() for t in tools]
        if system is not None:
            params["system"] = system
        return _Turn(self, params)

    # -- helpers for _Turn --------------------------------------------------------

    async def _open(self, params: dict[str, Any]) -> anthropic.AsyncStream[RawMessageStreamEvent]:
        stream: anthropic.AsyncStream[RawMessageStreamEvent]
        stream = await self._client.messages.create(**params, stream=True)
        return stream

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


class _Turn:
    """One streamed turn: what :meth:`AnthropicModel.stream` returns.

    It is both the async context manager and the async iterator it yields. A
    plain class rather than an async generator, so that no cancel scope is
    ever held across a ``yield`` and the response is closed in ``__aexit__``.

    The request goes through the SDK (``messages.create(stream=True)``), which
    sends it and raises for an error status; the body is then read here, from
    the SDK's ``httpx2`` response. The SDK's own event iterator is not used:
    it leaves its chain of async generators suspended when it raises for an
    ``error`` event or when its consumer stops early, and Trio warns when the
    garbage collector finds them.
    """

    def __init__(self, model: AnthropicModel, params: dict[str, Any]) -> None:
        self._model = model
        self._params = params
        self._policy = model._retry
        self._response: _httpx.Response | None = None
        self._body: AsyncIterator[bytes] | None = None
        self._decoder = SSEDecoder(errors="strict")
        self._frames: deque[ServerSentEvent] = deque()
        self._pending: deque[ModelEvent] = deque()
        self._attempt = 0
        self._backoff: float | None = None
        self._finished = False
        self._closed = False
        self._busy = False
        self._reset()

    def _reset(self) -> None:
        """Forget what the current attempt streamed."""
        self._decoder = SSEDecoder(errors="strict")
        self._frames.clear()
        self._eof = False
        self._emitted = 0
        self._stopped = False
        self._stop_reason: str | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._tools: dict[int, tuple[str, str, list[str], dict[str, Any]]] = {}

    async def __aenter__(self) -> AsyncIterator[ModelEvent]:
        if self._model._closed:
            raise trio.ClosedResourceError("the AnthropicModel was closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        await self._release()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ModelEvent:
        if self._busy:
            raise trio.BusyResourceError("another task is already iterating this stream")
        self._busy = True
        try:
            return await self._next()
        finally:
            self._busy = False

    async def _next(self) -> ModelEvent:
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._finished:
                raise StopAsyncIteration
            if self._closed:
                raise trio.ClosedResourceError("the stream's async with block was left")
            if self._backoff is not None:
                delay, self._backoff = self._backoff, None
                await trio.sleep(delay)
            try:
                if self._body is None:
                    self._attempt += 1
                    self._reset()
                    stream = await self._model._open(self._params)
                    self._response = stream.response
                    self._body = stream.response.aiter_bytes()
                event = await self._next_event()
                if event is None:
                    await self._release()
                    self._finished = True
                    return self._turn_end()
                self._handle(event)
            except Exception as exc:
                await self._release()
                notice = self._retry_or_raise(exc)
                self._backoff = notice.delay
                return notice

    async def _next_event(self) -> dict[str, Any] | None:
        """The next event's data, or ``None`` after ``message_stop`` and the end of the body.

        Raises:
            anthropic.APIStatusError: an ``error`` event.
            anthropic.APIConnectionError: the connection failed, or the body
                ended before ``message_stop``.
            anthropic.APITimeoutError: the server went silent for too long.
            InvalidStreamData: an event's data is not a JSON object, or a
                line of the body is not UTF-8.
        """
        assert self._body is not None
        assert self._response is not None
        decoder = self._decoder
        frames = self._frames
        while True:
            while frames:
                frame = frames.popleft()
                name, text = frame.event, frame.data
                if name == "ping":
                    continue
                try:
                    data = _loads(text)
                except ValueError as exc:
                    if name != "error":
                        raise InvalidStreamData(
                            self._response,
                            f"the data of a {name!r} event is not JSON ({exc})",
                            text,
                        ) from None
                    data = text
                if name == "error" or (isinstance(data, dict) and data.get("type") == "error"):
                    body = data if isinstance(data, dict) else {"error": {"message": text}}
                    raise anthropic.APIStatusError(f"{body}", response=self._response, body=body)
                if not isinstance(data, dict):
                    raise InvalidStreamData(
                        self._response, f"the data of a {name!r} event is not a JSON object", text
                    )
                return data
            if self._eof:
                if self._stopped:
                    return None
                raise anthropic.APIConnectionError(
                    message="the response ended before its message_stop event",
                    request=self._response.request,
                )
            try:
                chunk = await self._body.__anext__()
            except StopAsyncIteration:
                self._eof = True
                chunk = None
            except _httpx.TimeoutException as exc:
                raise anthropic.APITimeoutError(request=self._response.request) from exc
            except _httpx.TransportError as exc:
                raise anthropic.APIConnectionError(request=self._response.request) from exc
            try:
                frames.extend(decoder.close() if chunk is None else decoder.feed(chunk))
            except UnicodeDecodeError as exc:
                raise InvalidStreamData(
                    self._response, f"a line of the event stream is not UTF-8 ({exc.reason})"
                ) from None

    def _handle(self, event: dict[str, Any]) -> None:
        """Turn one event of the stream into zero or one pending model event."""
        try:
            etype = event.get("type")
            if etype == "content_block_delta":
                delta = event["delta"]
                if delta["type"] == "text_delta":
                    if delta["text"]:
                        self._emit(TextDelta(str(delta["text"])))
                elif delta["type"] == "input_json_delta" and event["index"] in self._tools:
                    self._tools[event["index"]][2].append(str(delta["partial_json"]))
            elif etype == "content_block_start":
                block = event["content_block"]
                if block["type"] == "tool_use":
                    initial = block.get("input")
                    initial = dict(initial) if isinstance(initial, Mapping) else {}
                    self._tools[event["index"]] = (block["id"], block["name"], [], initial)
            elif etype == "content_block_stop":
                if event["index"] in self._tools:
                    self._emit(self._tool_call(*self._tools.pop(event["index"])))
            elif etype == "message_start":
                usage = event["message"].get("usage") or {}
                self._input_tokens = int(usage.get("input_tokens") or 0)
                self._output_tokens = int(usage.get("output_tokens") or 0)
            elif etype == "message_delta":
                self._stop_reason = event["delta"].get("stop_reason")
                usage = event.get("usage") or {}
                if usage.get("output_tokens") is not None:
                    self._output_tokens = int(usage["output_tokens"])
                if usage.get("input_tokens") is not None:
                    self._input_tokens = int(usage["input_tokens"])
            elif etype == "message_stop":
                self._stopped = True
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelError(
                f"malformed {event.get('type')!r} event in the stream: {type(exc).__name__}: {exc}",
                kind="invalid_response",
            ) from None

    def _emit(self, event: ModelEvent) -> None:
        self._emitted += 1
        self._pending.append(event)

    def _tool_call(
        self, call_id: str, name: str, pieces: list[str], initial: dict[str, Any]
    ) -> ToolCall:
        text = "".join(pieces)
        if not text.strip():
            return ToolCall(call_id, name, initial)
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ModelError(
                f"the input of tool call {call_id} ({name}) is not valid JSON: {exc}",
                kind="invalid_response",
            ) from None
        if not isinstance(value, dict):
            raise ModelError(
                f"the input of tool call {call_id} ({name}) is not a JSON object",
                kind="invalid_response",
            )
        return ToolCall(call_id, name, value)

    def _turn_end(self) -> TurnEnd:
        reason: StopReason | str
        try:
            reason = StopReason(self._stop_reason or StopReason.END_TURN)
        except ValueError:
            reason = str(self._stop_reason)
        return TurnEnd(reason, Usage(self._input_tokens, self._output_tokens))

    def _retry_or_raise(self, exc: Exception) -> RetryNotice:
        """The notice of the retry ``exc`` calls for, or raise the :class:`ModelError` it means."""
        if isinstance(exc, ModelError):
            raise exc
        classified = _classify(exc)
        if classified is None:
            raise exc
        kind, status, retryable = classified
        description = self._model._redact(_describe(exc))
        if not retryable:
            raise ModelError(
                f"Claude request failed: {description}", kind=kind, status=status
            ) from None
        if self._attempt >= self._policy.attempts or not self._policy.should_retry(exc):
            raise ModelError(
                f"Claude request failed after {self._attempt} attempt(s): {description}",
                kind=kind,
                status=status,
                retryable=True,
            ) from None
        delay = self._policy.next_delay(self._attempt)
        hint = _retry_after(exc)
        if hint is not None:
            cap = self._policy.max_retry_after
            if hint > cap:
                raise ModelError(
                    f"Claude request failed: the server asked to retry after {hint:g} s, "
                    f"longer than the retry policy's max_retry_after of {cap:g} s: {description}",
                    kind=kind,
                    status=status,
                    retryable=True,
                    retry_after=hint,
                ) from None
            delay = max(delay, hint)
        return RetryNotice(
            attempt=self._attempt,
            delay=delay,
            error=description,
            kind=kind,
            restarted=self._emitted > 0,
        )

    async def _release(self) -> None:
        """Close the current attempt's HTTP response, if any, shielded from cancellation."""
        response, self._response = self._response, None
        body, self._body = self._body, None
        if response is None:
            return
        with trio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            try:
                await response.aclose()
            except Exception:  # the response is abandoned anyway
                pass
            if body is not None:
                # Run httpx's chain of async generators to its end (the closed
                # response makes the next read fail at once), so that none is
                # left suspended for the garbage collector, which Trio warns of.
                try:
                    while True:
                        await body.__anext__()
                except Exception:
                    pass


# -- errors ---------------------------------------------------------------------


_EXCERPT = 60
"""Characters of invalid data quoted in an error message."""


class InvalidStreamData(anthropic.APIResponseValidationError):
    """The body of a streamed response holds what the API never sends.

    A ``data:`` field that is not a JSON object (text, a number, a truncated
    object) or a line that is not UTF-8. The attempt fails and is retried
    like a stream cut short (``kind="invalid_response"``), since the next
    attempt may well get a sound stream; it is never silently skipped.

    Args:
        response: The attempt's HTTP response.
        what: What is wrong, for the message.
        data: The offending data, quoted (shortened) in the message.
    """

    def __init__(self, response: _httpx.Response, what: str, data: str | None = None) -> None:
        message = what
        if data is not None:
            excerpt = data if len(data) <= _EXCERPT else data[:_EXCERPT] + "..."
            message += f": {excerpt!r}"
        super().__init__(response, None, message=message)


def _error_field(body: object, field: str) -> str | None:
    """``body["error"][field]`` if it is a string."""
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            value = error.get(field)
            if isinstance(value, str):
                return value
    return None


def _classify(exc: BaseException) -> tuple[str, int | None, bool] | None:
    """``(kind, status, retryable)`` of a failure, or ``None`` if it is not an API failure."""
    if isinstance(exc, anthropic.APIStatusError):
        code = exc.status_code
        status = code if code >= 400 else None  # an error event mid-stream has status 200
        error_type = _error_field(exc.body, "type")
        if code == 529:
            return "overloaded", status, True
        if code == 429:
            return "rate_limit", status, True
        if code == 408:
            return "timeout", status, True
        if code >= 500 or code < 400:
            kind = _RETRYABLE_KINDS_BY_ERROR_TYPE.get(error_type or "", "server_error")
            return kind, status, True
        return _KINDS_BY_STATUS.get(code, "client_error"), status, False
    if isinstance(exc, (anthropic.APITimeoutError, _httpx.TimeoutException)):
        return "timeout", None, True
    if isinstance(exc, (anthropic.APIConnectionError, _httpx.TransportError)):
        return "connection", None, True
    if isinstance(exc, InvalidStreamData):
        return "invalid_response", None, True
    if isinstance(exc, anthropic.APIResponseValidationError):
        return "invalid_response", exc.status_code, False
    return None


def _describe(exc: BaseException) -> str:
    """The type and message of a failure, for a notice or an error: no headers, no traceback."""
    name = type(exc).__name__
    if isinstance(exc, anthropic.APIStatusError):
        error_type = _error_field(exc.body, "type")
        message = _error_field(exc.body, "message") or exc.message
        code = f"{exc.status_code} " if exc.status_code >= 400 else "mid-stream "
        text = f"{name}: {code}{error_type or 'error'}: {message}"
        request_id = exc.response.headers.get("request-id")
        return f"{text} (request-id {request_id})" if request_id else text
    text = f"{name}: {exc}" if str(exc) else name
    cause = exc.__cause__
    if isinstance(exc, anthropic.APIConnectionError) and cause is not None:
        text += f" ({_describe(cause)})"
    return text


def _retry_after(exc: BaseException) -> float | None:
    """The seconds the server asked to wait (``retry-after-ms`` or ``retry-after``), if any."""
    if not isinstance(exc, anthropic.APIStatusError):
        return None
    headers = exc.response.headers
    value: float | None = None
    try:
        value = float(headers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        raw = headers.get("retry-after")
        if raw is not None:
            try:
                value = float(raw)
            except ValueError:
                parsed = email.utils.parsedate_tz(raw)
                if parsed is not None:
                    value = email.utils.mktime_tz(parsed) - time.time()
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return value
