"""OpenAI and OpenAI-compatible servers through the official ``openai`` SDK: :class:`OpenAIModel`.

:class:`OpenAIModel` implements :class:`~trioflow.models.Model` on the
streaming Chat Completions API (``POST /v1/chat/completions`` with
``"stream": true``), which OpenAI serves and so do vLLM, Ollama, LM Studio,
llama.cpp's server and most gateways: point ``base_url`` at them. It runs the
SDK's async client under Trio (the SDK's HTTP stack, ``httpx2``, is built on
anyio, which supports Trio), turns each streamed ``content`` delta into a
:class:`~trioflow.models.TextDelta` as it arrives, the ``tool_calls`` deltas
(an ``id`` and a ``function.name``, then ``function.arguments`` in pieces,
several calls told apart by their ``index``) into
:class:`~trioflow.models.ToolInputDelta` events as they arrive (an empty
first one once the call's ``id`` and name are known, then one per piece of
``arguments``) and one :class:`~trioflow.models.ToolCall` per call once the
choice has its ``finish_reason``, and ends every turn with a
:class:`~trioflow.models.TurnEnd` carrying the usage of the final chunk
(requested with ``stream_options: {"include_usage": true}``).

Its guarantees are :class:`~trioflow.models.AnthropicModel`'s, from the same
code (``trioflow.models._sdk``): trioflow's retries, not the SDK's (the client
is made with ``max_retries=0``), each announced by a
:class:`~trioflow.models.RetryNotice`: rate limits (``429``, honouring
``retry-after`` up to the policy's
:attr:`~trioflow.RetryPolicy.max_retry_after`), server errors (``5xx``,
``408``), timeouts, connection errors, streams that break off before
``data: [DONE]`` (or carry an ``{"error": ...}`` chunk) and streams that carry
invalid data. Not retried: other client errors (``400``, ``401``, ``403``,
``404`` for an unknown model, ...) and a tool call whose arguments are not a
JSON object. Cancelling a consumer closes the HTTP response at once; the
model's own HTTP client is closed explicitly by :meth:`OpenAIModel.aclose`
(the SDK's default client would reach for an asyncio loop from its
finalizer, which fails under Trio). The API key never appears in an event,
an exception message or a ``repr``.

How trioflow's conversation maps to Chat Completions: the system prompt is a
first ``system`` message; an assistant message's tool uses are its
``tool_calls`` (arguments as JSON text); each tool result is a ``tool``
message (``tool_call_id``, the result as ``content``; a failed call's
content is prefixed ``"error: "``, as the API has no error flag) placed right
after the assistant message, before the user's text; a tool is a
``function`` with its JSON schema as ``parameters``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import httpx2
import openai

from trioflow._json import loads as _loads
from trioflow.models._base import (
    Message,
    ModelError,
    ModelEvent,
    StopReason,
    TextDelta,
    ToolInputDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
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

__all__ = [
    "BASE_URL_VARIABLE",
    "DEFAULT_OPENAI_MODEL",
    "DEFAULT_OPENAI_RETRY",
    "OpenAIModel",
    "chat_messages",
]

DEFAULT_OPENAI_MODEL: Final = "gpt-4.1-mini"
"""The model :class:`OpenAIModel` uses unless told otherwise."""

DEFAULT_OPENAI_RETRY: Final = RetryPolicy(attempts=4, base_delay=0.5)
"""The retry policy of :class:`OpenAIModel` by default: 4 attempts, after 0.5 s, 1 s, 2 s."""

BASE_URL_VARIABLE: Final = "TRIOFLOW_OPENAI_BASE_URL"
"""The environment variable holding the server's URL when ``base_url`` is not given."""

_STOP_REASONS: Mapping[str, StopReason] = {
    "stop": StopReason.END_TURN,
    "tool_calls": StopReason.TOOL_USE,
    "function_call": StopReason.TOOL_USE,
    "length": StopReason.MAX_TOKENS,
    "content_filter": StopReason.REFUSAL,
}
"""trioflow's stop reason of each ``finish_reason``."""


class OpenAIModel(SDKModel):
    """An OpenAI-compatible chat model, through the official ``openai`` SDK.

    Use it as an async context manager, which closes its HTTP client on exit
    (or call :meth:`aclose`)::

        async with OpenAIModel("qwen3:8b", base_url="http://localhost:11434/v1") as model:
            async with model.stream([Message.user("Hi")]) as events:
                async for event in events:
                    ...

    Args:
        model: The model to call, as the server names it (``"gpt-4.1-mini"``,
            ``"meta-llama/Llama-3.1-8B-Instruct"``, ``"qwen3:8b"``).
        api_key: The API key; ``$OPENAI_API_KEY`` when ``None``. Servers
            that check no key (Ollama, a local vLLM) still need one to be
            set: any text will do. Ignored when ``client`` is given.
        base_url: The API's URL, up to and including ``/v1``;
            ``$TRIOFLOW_OPENAI_BASE_URL`` when ``None``, else the SDK's
            default (``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``).
            Ignored when ``client`` is given.
        max_tokens: The most tokens one turn may generate.
        max_tokens_field: The request field carrying ``max_tokens``:
            ``"max_tokens"`` (understood by every compatible server) or
            ``"max_completion_tokens"`` (which OpenAI's reasoning models
            require).
        retry: How often and after which delays to retry a failed request;
            :data:`DEFAULT_OPENAI_RETRY` when ``None``. Only failures of a
            retryable kind are retried, and only if ``retry.should_retry``
            accepts the SDK exception behind them
            (:class:`openai.RateLimitError`,
            :class:`openai.InternalServerError`,
            :class:`openai.APIConnectionError` also for a stream cut short,
            :class:`openai.APITimeoutError`, :class:`openai.APIStatusError`
            for an error chunk mid-stream, or
            :class:`openai.APIResponseValidationError` for invalid data in
            the stream), so ``retry_on`` can narrow them down. A server's
            ``retry-after`` longer than the backoff replaces it, up to
            ``retry.max_retry_after``; a longer one fails the request at once
            with a :class:`~trioflow.models.ModelError` instead of sleeping.
        timeout: Seconds the SDK waits for the server (per read, connect,
            ...); ``None`` for no timeout. Ignored when ``client`` is given.
        client: An SDK client to use instead of a new one. The model uses a
            copy with the SDK's own retries turned off, and does not close
            it: its owner does.

    Raises:
        ModelError: ``kind="authentication"``: no ``client`` was given and no
            API key either, as an argument or in ``$OPENAI_API_KEY``. The
            check happens here, at construction, not at the first request.
        ValueError: ``model`` is empty, ``max_tokens`` < 1 or
            ``max_tokens_field`` is neither of its two values.
    """

    def __init__(
        self,
        model: str = DEFAULT_OPENAI_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = 1024,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        retry: RetryPolicy | None = None,
        timeout: float | None = 600.0,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        if not model:
            raise ValueError("model must be a model name, not empty")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {max_tokens!r}")
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(
                "max_tokens_field must be 'max_tokens' or 'max_completion_tokens', "
                f"not {max_tokens_field!r}"
            )
        self._max_tokens_field = max_tokens_field
        if client is None:
            key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
            if not key:
                raise ModelError(
                    "no OpenAI API key: pass api_key=... or set OPENAI_API_KEY "
                    "(to any text for a server that checks none)",
                    kind="authentication",
                )
            url = base_url or os.environ.get(BASE_URL_VARIABLE) or None
            # Our own HTTP client, not the SDK's default wrapper, whose
            # finalizer reaches for a running asyncio loop.
            self._client: openai.AsyncOpenAI = openai.AsyncOpenAI(
                api_key=key,
                base_url=url,
                max_retries=0,
                timeout=timeout,
                http_client=openai.DefaultAsyncHttpxClient(),
            )
        else:
            self._client = client.with_options(max_retries=0)
        client_key = self._client.api_key
        self._setup(
            model,
            max_tokens=max_tokens,
            retry=retry if retry is not None else DEFAULT_OPENAI_RETRY,
            owns_client=client is None,
            credentials=(
                client_key if isinstance(client_key, str) else None,
                getattr(self._client, "admin_api_key", None),
                getattr(self._client, "webhook_secret", None),
            ),
        )

    # -- what SDKModel asks of its subclasses ----------------------------------------

    @property
    def _max_tokens_key(self) -> str:
        return self._max_tokens_field

    def _params(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], system: str | None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self._model,
            "messages": chat_messages(messages, system=system),
            "stream_options": {"include_usage": True},
            self._max_tokens_field: self._max_tokens,
        }
        if tools:
            params["tools"] = [_tool_dict(t) for t in tools]
        return params

    async def _open(self, params: dict[str, Any]) -> httpx2.Response:
        stream: openai.AsyncStream[Any]
        stream = await self._client.chat.completions.create(**params, stream=True)
        return stream.response

    def _parser(self, response: httpx2.Response) -> StreamParser:
        return _ChunkParser(response)


def chat_messages(
    messages: Sequence[Message], *, system: str | None = None
) -> list[dict[str, Any]]:
    """The Chat Completions ``messages`` of a trioflow conversation.

    Args:
        messages: The conversation.
        system: The system prompt, sent first as a ``system`` message.

    Returns:
        JSON-ready dicts: ``system``, ``user``, ``assistant`` (with
        ``tool_calls``) and ``tool`` messages, each tool result in a ``tool``
        message right after the assistant message that called it.
    """
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": system})
    for message in messages:
        text = message.text
        if message.role == "assistant":
            calls = [b for b in message.content if isinstance(b, ToolUseBlock)]
            entry: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = [_call_dict(c) for c in calls]
            else:
                entry["content"] = text
            out.append(entry)
            continue
        results = [b for b in message.content if isinstance(b, ToolResultBlock)]
        for result in results:
            content = f"error: {result.content}" if result.is_error else result.content
            out.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": content})
        if text or not results:
            out.append({"role": "user", "content": text})
    return out


def _call_dict(call: ToolUseBlock) -> dict[str, Any]:
    arguments = json.dumps(dict(call.input), ensure_ascii=False)
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _tool_dict(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.input_schema),
        },
    }


class _ChunkParser(StreamParser):
    """Reads a stream of ``chat.completion.chunk`` objects: one attempt's state.

    Only the first choice (``index`` 0) is read: trioflow asks for one.
    """

    end_marker = "data: [DONE]"

    def __init__(self, response: httpx2.Response) -> None:
        super().__init__(response)
        self._finish_reason: str | None = None
        self._input_tokens = 0
        self._output_tokens = 0
        self._tools: dict[int, list[Any]] = {}  # index -> [id, name, pieces, streamed]
        self._called = False

    def data(self, frame: ServerSentEvent) -> dict[str, Any] | None:
        text = frame.data
        if text.strip() == "[DONE]":
            self.finished = True
            return {}
        if not text.strip():
            return None
        try:
            data = _loads(text)
        except ValueError as exc:
            raise InvalidChunkData(
                self.response, f"the data of a chunk is not JSON ({exc})", text
            ) from None
        if not isinstance(data, dict):
            raise InvalidChunkData(self.response, "the data of a chunk is not a JSON object", text)
        if "error" in data:
            error = data["error"]
            message = error.get("message") if isinstance(error, Mapping) else None
            raise openai.APIStatusError(str(message or error), response=self.response, body=error)
        return data

    def handle(self, data: dict[str, Any]) -> list[ModelEvent]:
        events: list[ModelEvent] = []
        try:
            usage = data.get("usage")
            if isinstance(usage, Mapping):
                self._input_tokens = int(usage.get("prompt_tokens") or 0)
                self._output_tokens = int(usage.get("completion_tokens") or 0)
            for choice in data.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if content:
                    events.append(TextDelta(str(content)))
                for position, call in enumerate(delta.get("tool_calls") or ()):
                    events.extend(self._add_piece(call, position))
                if choice.get("finish_reason"):
                    self._finish_reason = str(choice["finish_reason"])
                    events.extend(self._calls())
            if self.finished:
                events.extend(self._calls())
        except ModelError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ModelError(
                f"malformed chunk in the stream: {type(exc).__name__}: {exc}",
                kind="invalid_response",
            ) from None
        return events

    def _add_piece(self, call: Mapping[str, Any], position: int) -> list[ModelEvent]:
        """Gather a fragment of tool call ``index``; its input deltas once its id and name are known."""
        index = int(call.get("index", position))
        # [id, name, argument pieces, how many pieces were streamed (-1: not started)]
        entry = self._tools.setdefault(index, [None, None, [], -1])
        if call.get("id") and entry[3] < 0:  # a streamed call keeps the id it was streamed with
            entry[0] = str(call["id"])
        function = call.get("function") or {}
        if function.get("name") and entry[3] < 0:
            entry[1] = str(function["name"])
        if function.get("arguments"):
            entry[2].append(str(function["arguments"]))
        if entry[0] and entry[1]:
            return self._stream(index, entry)
        return []

    @staticmethod
    def _stream(index: int, entry: list[Any]) -> list[ModelEvent]:
        """The input deltas of the call ``entry`` not yet streamed (the first one if it is new)."""
        call_id, name, pieces, sent = entry
        events: list[ModelEvent] = []
        if sent < 0:
            events.append(ToolInputDelta(call_id, name, "", index, first=True))
            sent = 0
        events.extend(ToolInputDelta(call_id, name, p, index) for p in pieces[sent:])
        entry[3] = len(pieces)
        return events

    def _calls(self) -> list[ModelEvent]:
        """The tool calls gathered so far, complete, in the order of their index."""
        events: list[ModelEvent] = []
        for index in sorted(self._tools):
            entry = self._tools[index]
            call_id, name, pieces, _ = entry
            if not name:
                raise ModelError(
                    f"tool call {index} of the stream has no function name",
                    kind="invalid_response",
                )
            entry[0] = call_id = call_id or f"call_{index}"
            events.extend(self._stream(index, entry))
            events.append(tool_call(call_id, name, "".join(pieces)))
        self._tools.clear()
        self._called = self._called or bool(events)
        return events

    def turn_end(self) -> TurnEnd:
        reason: StopReason | str
        if self._called:  # some servers say "stop" after tool calls
            reason = StopReason.TOOL_USE
        elif self._finish_reason is None:
            reason = StopReason.END_TURN
        else:
            reason = _STOP_REASONS.get(self._finish_reason, self._finish_reason)
        return TurnEnd(reason, Usage(self._input_tokens, self._output_tokens))


# -- errors ---------------------------------------------------------------------


class InvalidChunkData(InvalidDataMixin, openai.APIResponseValidationError):
    """Invalid data in a Chat Completions stream (see :class:`~trioflow.models._sdk.InvalidDataMixin`).

    A ``data:`` field that is neither ``[DONE]`` nor a JSON object, or a line
    that is not UTF-8.

    Args:
        response: The attempt's HTTP response.
        what: What is wrong, for the message.
        data: The offending data, quoted (shortened) in the message.
    """


OpenAIModel._dialect = SDKDialect(
    openai,
    label="OpenAI",
    invalid_data=InvalidChunkData,
    request_id_header="x-request-id",
    nested_error=False,  # the SDK keeps the body's "error" object
)
