"""What the models on the official SDKs share: the streamed turn, retries, redaction, closing.

The ``anthropic`` and ``openai`` SDKs are generated from one template: the
same client (on ``httpx2`` and anyio), the same exception hierarchy
(``APIStatusError``, ``APIConnectionError``, ``APITimeoutError``,
``APIResponseValidationError``), the same ``AsyncStream`` holding the HTTP
response. :class:`SDKModel` and :class:`StreamedTurn` hold everything
:class:`~trioflow.models.AnthropicModel` and
:class:`~trioflow.models.OpenAIModel` do alike:

- the request goes through the SDK (authentication, headers, an error status
  raised as the SDK's exception), with the SDK's own retries off;
- the body's Server-Sent Events are decoded here (by
  :class:`trioflow.sse.SSEDecoder`), from the SDK's HTTP response, not by the
  SDK's event iterator, which leaves its chain of async generators suspended
  when it raises or its consumer stops early (Trio warns, with a
  ``ResourceWarning``, when the garbage collector finds them);
- a failure is classified (:meth:`SDKDialect.classify`), described without
  headers or credentials (:meth:`SDKDialect.describe`) and retried by
  trioflow's :class:`~trioflow.RetryPolicy`, honouring ``retry-after``
  (:func:`retry_after`) up to its ``max_retry_after``;
- the HTTP response is closed, shielded from cancellation, when a turn's
  ``async with`` block exits, and the client when the model is closed;
- credentials never appear in an event, an exception message or a ``repr``.

What differs, the wire format of the stream, is a :class:`StreamParser` per
API, one per attempt.
"""

from __future__ import annotations

import abc
import email.utils
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import ModuleType, TracebackType
from typing import Any, ClassVar, Final, Protocol, Self, cast

import httpx2
import trio

from trioflow.models._base import (
    Message,
    ModelError,
    ModelEvent,
    RetryNotice,
    ToolCall,
    ToolSpec,
    TurnEnd,
)
from trioflow.sse import ServerSentEvent, SSEDecoder
from trioflow.supervise import RetryPolicy

__all__ = [
    "CLOSE_TIMEOUT",
    "InvalidDataMixin",
    "SDKDialect",
    "SDKModel",
    "StatusError",
    "StreamParser",
    "StreamedTurn",
    "error_field",
    "excerpt",
    "retry_after",
    "tool_call",
]

CLOSE_TIMEOUT: Final = 5.0
"""Seconds a shielded close of an HTTP response or client may take."""

_MIN_SECRET = 8
"""Credentials at least this long are scrubbed from messages."""

_EXCERPT = 60
"""Characters of invalid data quoted in an error message."""

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
"""The kind of a client error (not retried), by HTTP status."""

_RETRYABLE_KINDS_BY_STATUS: Mapping[int, str] = {
    529: "overloaded",
    429: "rate_limit",
    408: "timeout",
}


class StatusError(Protocol):
    """What trioflow reads of an SDK's ``APIStatusError``."""

    @property
    def status_code(self) -> int:
        """The HTTP status (200 for an error reported mid-stream)."""
        ...

    @property
    def body(self) -> object:
        """The parsed error body."""
        ...

    @property
    def message(self) -> str:
        """The SDK's message."""
        ...

    @property
    def response(self) -> httpx2.Response:
        """The HTTP response."""
        ...


def excerpt(what: str, data: str | None) -> str:
    """``what``, followed by ``data`` quoted and shortened, when given."""
    if data is None:
        return what
    shown = data if len(data) <= _EXCERPT else data[:_EXCERPT] + "..."
    return f"{what}: {shown!r}"


def error_field(error: object, field: str) -> str | None:
    """``error[field]`` if ``error`` is a mapping and that is a string."""
    if isinstance(error, Mapping):
        value = error.get(field)
        if isinstance(value, str):
            return value
    return None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds the server asked to wait (``retry-after-ms`` or ``retry-after``), if any.

    ``retry-after`` may be a number of seconds or an HTTP date. A negative,
    infinite or unreadable value counts as no hint.
    """
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


class InvalidDataMixin:
    """The body of a streamed response holds what the API never sends.

    A ``data:`` field that is not a JSON object (text, a number, a truncated
    object) or a line that is not UTF-8. The attempt fails and is retried
    like a stream cut short (``kind="invalid_response"``), since the next
    attempt may well get a sound stream; it is never silently skipped.

    Mixed into a subclass of an SDK's ``APIResponseValidationError``, so that
    a :class:`~trioflow.RetryPolicy`'s ``retry_on`` can name that class.

    Args:
        response: The attempt's HTTP response.
        what: What is wrong, for the message.
        data: The offending data, quoted (shortened) in the message.
    """

    def __init__(self, response: httpx2.Response, what: str, data: str | None = None) -> None:
        # The next class in the MRO is the SDK's APIResponseValidationError.
        super().__init__(response, None, message=excerpt(what, data))  # type: ignore[call-arg]


class SDKDialect:
    """One SDK's exception classes, and how its failures read.

    The ``anthropic`` and ``openai`` SDKs name their exceptions alike; the
    dialect takes them from the SDK's module.

    Args:
        sdk: The SDK's module (``anthropic``, ``openai``).
        label: How error messages name the model's API (``"Claude"``).
        invalid_data: The model's :class:`InvalidDataMixin` exception class.
        request_id_header: The response header carrying the request's id.
        nested_error: Whether a status error's ``body`` holds the API's
            error object under ``"error"`` (Anthropic's SDK) rather than
            being that object (OpenAI's).
        retryable_kinds_by_error_type: The kind of a retryable failure
            (``5xx`` or mid-stream), by the API's error type;
            ``"server_error"`` for a type not listed.
    """

    def __init__(
        self,
        sdk: ModuleType,
        *,
        label: str,
        invalid_data: type[Exception],
        request_id_header: str,
        nested_error: bool,
        retryable_kinds_by_error_type: Mapping[str, str] | None = None,
    ) -> None:
        self._sdk = sdk
        self.label = label
        self.status_error: type[Exception] = sdk.APIStatusError
        self.timeout_error: type[Exception] = sdk.APITimeoutError
        self.connection_error: type[Exception] = sdk.APIConnectionError
        self.validation_error: type[Exception] = sdk.APIResponseValidationError
        self.invalid_data = invalid_data
        self.request_id_header = request_id_header
        self._nested_error = nested_error
        self._retryable_kinds = dict(retryable_kinds_by_error_type or {})

    def error_object(self, exc: StatusError) -> object:
        """The API's error object (with ``type`` and ``message``) of a status error."""
        body = exc.body
        if not self._nested_error:
            return body
        return body.get("error") if isinstance(body, Mapping) else None

    def cut_short(self, request: httpx2.Request, message: str) -> Exception:
        """The SDK's ``APIConnectionError`` for a stream that ended too soon."""
        error: Exception = self._sdk.APIConnectionError(message=message, request=request)
        return error

    def timed_out(self, request: httpx2.Request) -> Exception:
        """The SDK's ``APITimeoutError``."""
        error: Exception = self._sdk.APITimeoutError(request=request)
        return error

    def transport_failed(self, request: httpx2.Request) -> Exception:
        """The SDK's ``APIConnectionError`` for a failed read."""
        error: Exception = self._sdk.APIConnectionError(request=request)
        return error

    def invalid(self, response: httpx2.Response, what: str, data: str | None = None) -> Exception:
        """The model's :attr:`invalid_data` exception."""
        return self.invalid_data(response, what, data)

    def error_type(self, exc: StatusError) -> str | None:
        """The API's error type of a status error (``rate_limit_error``, ``server_error``)."""
        return error_field(self.error_object(exc), "type")

    def classify(self, exc: BaseException) -> tuple[str, int | None, bool] | None:
        """``(kind, status, retryable)`` of a failure, or ``None`` if it is not an API failure."""
        if isinstance(exc, self.status_error):
            error = cast(StatusError, exc)
            code = error.status_code
            status = code if code >= 400 else None  # an error mid-stream has status 200
            if status is None:
                # Some servers (vLLM) give a mid-stream error the status it stands for.
                inner = self.error_object(error)
                inner_code = inner.get("code") if isinstance(inner, Mapping) else None
                if isinstance(inner_code, int) and 400 <= inner_code < 500:
                    code = inner_code
            if code in _RETRYABLE_KINDS_BY_STATUS:
                return _RETRYABLE_KINDS_BY_STATUS[code], status, True
            if code >= 500 or code < 400:
                error_type = self.error_type(error) or ""
                kind = self._retryable_kinds.get(error_type, "server_error")
                return kind, status, True
            return _KINDS_BY_STATUS.get(code, "client_error"), status, False
        if isinstance(exc, (self.timeout_error, httpx2.TimeoutException)):
            return "timeout", None, True
        if isinstance(exc, (self.connection_error, httpx2.TransportError)):
            return "connection", None, True
        if isinstance(exc, self.invalid_data):
            return "invalid_response", None, True
        if isinstance(exc, self.validation_error):
            return "invalid_response", getattr(exc, "status_code", None), False
        return None

    def describe(self, exc: BaseException) -> str:
        """The type and message of a failure: no headers, no traceback, no credentials redacted yet."""
        name = type(exc).__name__
        if isinstance(exc, self.status_error):
            error = cast(StatusError, exc)
            error_type = self.error_type(error)
            message = error_field(self.error_object(error), "message") or error.message
            code = f"{error.status_code} " if error.status_code >= 400 else "mid-stream "
            text = f"{name}: {code}{error_type or 'error'}: {message}"
            request_id = error.response.headers.get(self.request_id_header)
            return f"{text} ({self.request_id_header} {request_id})" if request_id else text
        text = f"{name}: {exc}" if str(exc) else name
        cause = exc.__cause__
        if isinstance(exc, self.connection_error) and cause is not None:
            text += f" ({self.describe(cause)})"
        return text

    def retry_after(self, exc: BaseException) -> float | None:
        """The server's ``retry-after`` hint of a status error, if any."""
        if not isinstance(exc, self.status_error):
            return None
        return retry_after(cast(StatusError, exc).response.headers)


class StreamParser(abc.ABC):
    """Reads one attempt's stream: frames in, model events out.

    Attributes:
        finished: whether the stream's end marker has arrived (``message_stop``,
            ``data: [DONE]``); a body that ends without it was cut short.
    """

    end_marker: ClassVar[str]
    """What ends the stream, for the message of one cut short (``"message_stop event"``)."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.finished = False

    @abc.abstractmethod
    def data(self, frame: ServerSentEvent) -> dict[str, Any] | None:
        """The JSON object of ``frame``, or ``None`` to skip it.

        Raises:
            Exception: the SDK's status error for an error reported
                mid-stream, or the dialect's invalid-data error.
        """

    @abc.abstractmethod
    def handle(self, data: dict[str, Any]) -> list[ModelEvent]:
        """The model events of one frame's data (often none).

        Raises:
            ModelError: ``kind="invalid_response"``: malformed data, a tool
                input that is not a JSON object.
        """

    @abc.abstractmethod
    def turn_end(self) -> TurnEnd:
        """The :class:`~trioflow.models.TurnEnd` of a stream that finished."""


class SDKModel(abc.ABC):
    """The part of a model on an official SDK that does not depend on its API.

    Subclasses set :attr:`_dialect`, make ``self._client`` and call
    :meth:`_setup`, and implement :meth:`_open` and :meth:`_parser`.
    """

    _dialect: ClassVar[SDKDialect]
    _client: Any

    def _setup(
        self,
        model: str,
        *,
        max_tokens: int,
        retry: RetryPolicy,
        owns_client: bool,
        credentials: tuple[object, ...],
    ) -> None:
        self._model = model
        self._max_tokens = max_tokens
        self._retry = retry
        self._owns_client = owns_client
        self._closed = False
        # Credentials to scrub from any text we produce (a server may echo a
        # key in an error message). Too short a string would mangle the text
        # and cannot be a real key.
        self._secrets = tuple(
            c for c in credentials if isinstance(c, str) and len(c) >= _MIN_SECRET
        )

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return (
            f"<{type(self).__name__} {self._model!r} base_url={str(self._client.base_url)!r} "
            f"max_tokens={self._max_tokens}{state}>"
        )

    @property
    def name(self) -> str:
        """The model's name, as passed to the API."""
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

        Later ``stream`` calls raise :class:`trio.ClosedResourceError`.

        Cancellation:
            The close is shielded from cancellation (with a short timeout of
            its own), so the connections are released even when cancelled.
        """
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self._client.close()

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        """Stream one turn of the model's reply to ``messages``.

        The ``async with`` block yields an async iterator of
        :data:`~trioflow.models.ModelEvent`: :class:`~trioflow.models.TextDelta`
        as text arrives, one :class:`~trioflow.models.ToolCall` per complete
        tool call (its input JSON arrives in pieces), a
        :class:`~trioflow.models.RetryNotice` before each retry, and one
        :class:`~trioflow.models.TurnEnd` last. The request is sent at the
        first iteration. After a :class:`~trioflow.models.RetryNotice`, the
        next iteration sleeps the notice's delay (on Trio's clock), then
        streams the turn again from its start: the events of the failed
        attempt are void.

        Args:
            messages: The conversation so far.
            tools: The tools the model may call.
            system: The system prompt, if any.

        Returns:
            An async context manager; leaving it closes the HTTP response.

        Raises:
            ModelError: On iteration, when the request failed for good:
                ``kind`` is ``"bad_request"`` (400), ``"authentication"``
                (401), ``"permission"`` (403), ``"not_found"`` (404: an
                unknown model, or a wrong URL), ... at once; or, with
                ``retryable=True``, ``"rate_limit"``, ``"overloaded"``,
                ``"server_error"``, ``"timeout"``, ``"connection"`` or
                ``"invalid_response"`` (a ``data:`` field that is not a JSON
                object, or bytes that are not UTF-8) once the retry policy's
                attempts are spent (or at once if its ``retry_on`` refuses the
                failure); at once, with ``retryable=True`` and
                :attr:`~trioflow.models.ModelError.retry_after` set, when the
                server asks to wait longer than the policy's
                ``max_retry_after`` (the message gives the hint and the
                cap); or ``"invalid_response"``, not retried, if a tool's
                input is not a JSON object or an event is malformed. The
                message names the error type, the API's message and the
                request id, with any credential redacted.
            trio.ClosedResourceError: On entry, if the model was closed; on
                iteration, if the block was left.
            trio.BusyResourceError: Two tasks iterate at once.

        Cancellation:
            Cancelling the iterating task closes the HTTP response (shielded,
            with a short timeout) when the ``async with`` block exits, so the
            server sees the connection close at once. Cancelled during a
            backoff sleep, no further attempt is made.
        """
        return StreamedTurn(self, self._params(messages, tools, system))

    @abc.abstractmethod
    def _params(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], system: str | None
    ) -> dict[str, Any]:
        """The keyword arguments of the SDK's create call for one turn."""

    @abc.abstractmethod
    async def _open(self, params: dict[str, Any]) -> httpx2.Response:
        """Send the streaming request through the SDK; the response, body unread.

        Raises:
            Exception: the SDK's exception for an error status or a failed connection.
        """

    @abc.abstractmethod
    def _parser(self, response: httpx2.Response) -> StreamParser:
        """A parser for one attempt's stream."""


class StreamedTurn:
    """One streamed turn of an :class:`SDKModel`: what its ``stream`` returns.

    It is both the async context manager and the async iterator it yields. A
    plain class rather than an async generator, so that no cancel scope is
    ever held across a ``yield`` and the response is closed in ``__aexit__``.
    """

    def __init__(self, model: SDKModel, params: dict[str, Any]) -> None:
        self._model = model
        self._dialect = model._dialect
        self._params = params
        self._policy = model._retry
        self._response: httpx2.Response | None = None
        self._body: AsyncIterator[bytes] | None = None
        self._parser: StreamParser | None = None
        self._decoder = SSEDecoder(errors="strict")
        self._frames: deque[ServerSentEvent] = deque()
        self._pending: deque[ModelEvent] = deque()
        self._attempt = 0
        self._backoff: float | None = None
        self._eof = False
        self._emitted = 0
        self._finished = False
        self._closed = False
        self._busy = False

    async def __aenter__(self) -> AsyncIterator[ModelEvent]:
        if self._model._closed:
            raise trio.ClosedResourceError(f"the {type(self._model).__name__} was closed")
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
                if self._parser is None:
                    self._attempt += 1
                    self._decoder = SSEDecoder(errors="strict")
                    self._frames.clear()
                    self._eof = False
                    self._emitted = 0
                    self._response = await self._model._open(self._params)
                    self._body = self._response.aiter_bytes()
                    self._parser = self._model._parser(self._response)
                parser = self._parser
                data = await self._next_data(parser)
                if data is None:
                    await self._release()
                    self._finished = True
                    return parser.turn_end()
                events = parser.handle(data)
                self._emitted += len(events)
                self._pending.extend(events)
            except Exception as exc:
                await self._release()
                notice = self._retry_or_raise(exc)
                self._backoff = notice.delay
                return notice

    async def _next_data(self, parser: StreamParser) -> dict[str, Any] | None:
        """The next frame's data, or ``None`` after the end marker and the end of the body.

        Raises:
            Exception: the SDK's ``APIConnectionError`` (the connection failed,
                or the body ended before the end marker), ``APITimeoutError``
                (the server went silent for too long), status error (an error
                reported mid-stream) or the dialect's invalid-data error.
        """
        assert self._body is not None
        response = parser.response
        while True:
            while self._frames:
                data = parser.data(self._frames.popleft())
                if data is not None:
                    return data
            if self._eof:
                if parser.finished:
                    return None
                raise self._dialect.cut_short(
                    response.request, f"the response ended before its {parser.end_marker}"
                )
            try:
                chunk = await self._body.__anext__()
            except StopAsyncIteration:
                self._eof = True
                chunk = None
            except httpx2.TimeoutException as exc:
                raise self._dialect.timed_out(response.request) from exc
            except httpx2.TransportError as exc:
                raise self._dialect.transport_failed(response.request) from exc
            try:
                decoder = self._decoder
                self._frames.extend(decoder.close() if chunk is None else decoder.feed(chunk))
            except UnicodeDecodeError as exc:
                raise self._dialect.invalid(
                    response, f"a line of the event stream is not UTF-8 ({exc.reason})"
                ) from None

    def _retry_or_raise(self, exc: Exception) -> RetryNotice:
        """The notice of the retry ``exc`` calls for, or raise the :class:`ModelError` it means."""
        if isinstance(exc, ModelError):
            raise exc
        dialect = self._dialect
        classified = dialect.classify(exc)
        if classified is None:
            raise exc
        kind, status, retryable = classified
        description = self._model._redact(dialect.describe(exc))
        label = dialect.label
        if not retryable:
            raise ModelError(
                f"{label} request failed: {description}", kind=kind, status=status
            ) from None
        if self._attempt >= self._policy.attempts or not self._policy.should_retry(exc):
            raise ModelError(
                f"{label} request failed after {self._attempt} attempt(s): {description}",
                kind=kind,
                status=status,
                retryable=True,
            ) from None
        delay = self._policy.next_delay(self._attempt)
        hint = dialect.retry_after(exc)
        if hint is not None:
            cap = self._policy.max_retry_after
            if hint > cap:
                raise ModelError(
                    f"{label} request failed: the server asked to retry after {hint:g} s, "
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
        self._parser = None
        if response is None:
            return
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
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


def tool_call(
    call_id: str, name: str, text: str, initial: Mapping[str, Any] | None = None
) -> ToolCall:
    """The :class:`~trioflow.models.ToolCall` whose input is the JSON ``text`` (``initial`` if blank).

    Raises:
        ModelError: ``kind="invalid_response"``: ``text`` is not JSON, or not a JSON object.
    """
    if not text.strip():
        return ToolCall(call_id, name, dict(initial or {}))
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
