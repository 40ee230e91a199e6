"""The Vercel AI SDK's UI message stream: what ``useChat`` reads.

The protocol of the ``ai`` package (version 5 and 6): Server-Sent Events
whose ``data:`` is one JSON *chunk* each (``start``, ``start-step``,
``text-start``/``-delta``/``-end``, ``tool-input-*``, ``tool-output-*``,
``data-*``, ``finish``, ``error``, ``abort``), ending with ``data: [DONE]``;
the response says ``x-vercel-ai-ui-message-stream: v1``. A run is one
assistant message.

Endpoints
    ``POST /vercel/chat``
        What ``useChat``'s default transport (``DefaultChatTransport``)
        posts: ``{"id", "messages", "trigger", "messageId"}``. The chat
        ``id`` is a trioflow thread (:mod:`trioflow.threads`): made on the
        first message of an unknown chat, or the thread itself when the id
        is a thread id; the text parts of the last (user) message are the
        run's message; the answer is the run's stream. Run options
        (``timeout``, ``max_iterations``, ``on_disconnect``, ``model``,
        ``system``, ``max_tokens``, ``temperature``, ``metadata``) may be
        added to the body (``useChat``'s ``body`` option).
    ``GET /vercel/chat/{id}/stream``
        The transport's ``reconnectToStream``: the chat's running run, from
        its start (the transport replays it) or after ``Last-Event-ID``;
        ``204`` when the chat has no run going (with ``Last-Event-ID``: the
        rest of its latest run, if any is left).
    ``GET /runs/{id}/events.vercel``
        Any run as a UI message stream (resume with ``Last-Event-ID`` or
        ``?after=``, as the event stream).

The mapping (:func:`ui_message_chunks`) is a pure function of one event, so
each event is encoded once per run and shared by every connection
(:mod:`trioflow.web._streams`); every id in it comes from the run id, the
iteration or the tool call id:

=============================  =====================================================
trioflow event                 chunks
=============================  =====================================================
``flow.started``               ``start`` (``messageId``: the run id;
                               ``messageMetadata``: ``runId``, ``threadId``)
``iteration.started``          ``start-step``
``step.started`` ``model``     ``text-start`` (id ``text-<iteration>``)
``token.received``             ``text-delta``
``token.chunk``                ``text-delta`` (with an ``iteration``; else a whole
                               ``text-start``/``-delta``/``-end`` of its own)
``warning`` of a model retry   ``text-end``, ``data-warning``, ``text-start``: the
                               voided text stays as a finished part of its own;
                               each of its ``discarded_tool_calls``:
                               ``tool-input-error`` (before ``data-warning``)
``step.completed`` ``model``   ``text-end``
``tool.approval_required``     ``tool-input-start`` (unless ``streamed``),
                               ``tool-input-available``, ``tool-approval-request``
                               (``approvalId``: the call id)
``tool.approved``              ``data-tool-approved`` (id: the call id)
``tool.denied``                ``tool-output-denied``
``tool.input_delta``           ``tool-input-start`` on a call's ``first`` delta,
                               ``tool-input-delta`` for each non-empty ``delta``
``tool.started``               streamed (``streamed: true``):
                               ``tool-input-available``; else
                               ``tool-input-start``, one ``tool-input-delta`` (the
                               whole input as JSON), ``tool-input-available``
``tool.progress``              ``data-tool-progress`` (id: the call id, updated in place)
``tool.completed``             ``tool-output-available``
``tool.failed``                ``tool-output-error``
``progress.update``            ``data-progress-update`` (id ``progress``, updated in place)
``iteration.completed``        ``finish-step``
``iteration.failed``           ``text-end``, ``finish-step``
``flow.completed``             ``finish``, then ``[DONE]``
``flow.failed``                ``error``, ``finish`` (``error``), then ``[DONE]``
``flow.cancelled``             by a client: ``abort``, ``finish`` (``other``); else
                               (a timeout, a shutdown): ``error``, ``finish``
                               (``error``); then ``[DONE]``
``add_message``,               nothing (the parts above already say it)
``remove_message``, tools'
``step.*``
any other event                ``data-<type>``: the type with each run of characters
                               other than letters, digits, ``_`` and ``-`` made one
                               ``-`` (``trade.executed``: ``data-trade-executed``);
                               ``data``: the event's data
=============================  =====================================================

Tool parts are ``providerExecuted``: the server runs them, so a ``useChat``
``onToolCall`` is not asked to. An approval is decided with ``POST
/runs/{id}/approvals/{call_id}`` (the run id is the message's id and its
``metadata.runId``).

Resume
    Each event's chunks go out together; the last frame of the group
    carries ``id: <seq>`` (an event with no chunk is a frame with the id
    alone), so ``Last-Event-ID`` never splits an event's chunks: no gap, no
    duplicate. A stream error (``evicted``, ``history_expired``) is an
    ``error`` chunk with ``code`` and the details, then ``[DONE]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from trioflow.events import EventType, FlowEvent
from trioflow.models._base import TextBlock, ToolResultBlock, ToolUseBlock
from trioflow.protocol import EVICTED
from trioflow.threads import Thread, ThreadLimitReached, ThreadNotFound
from trioflow.web._body import read_json
from trioflow.web._errors import ApiError
from trioflow.web._runs import RunRequest, store_unavailable
from trioflow.web._sse import (
    KEEPALIVE,
    EventStreamResponse,
    StreamFormat,
    event_stream_answer,
)
from trioflow.web._streams import Encoding

if TYPE_CHECKING:
    from trioflow.web._runs import RunHub

__all__ = [
    "CHAT_PATH",
    "STREAM_HEADER",
    "VERCEL",
    "VERCEL_FORMAT",
    "ChatThreads",
    "chat_threads",
    "data_part_type",
    "parse_chat",
    "run_vercel",
    "ui_message_chunks",
    "ui_messages",
    "vercel_chat",
    "vercel_chat_messages",
    "vercel_chat_stream",
]

CHAT_PATH = "/vercel/chat"
"""Where ``useChat``'s transport posts (its ``api``); the resume is ``{CHAT_PATH}/{id}/stream``."""

STREAM_HEADER = (b"x-vercel-ai-ui-message-stream", b"v1")
"""The response header that marks a UI message stream."""

_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
    STREAM_HEADER,
)

_DONE = b"data: [DONE]\n\n"
_NAME = re.compile(r"[^A-Za-z0-9_-]+")
_SILENT = frozenset({str(EventType.ADD_MESSAGE), str(EventType.REMOVE_MESSAGE)})
_CLIENT_CANCELS = frozenset({"cancelled", "cancelled by client", "client disconnected"})
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool-calls",
    "max_tokens": "length",
    "refusal": "content-filter",
}


def _default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


_encoder = json.JSONEncoder(separators=(",", ":"), default=_default, allow_nan=False)


# -- the mapping --------------------------------------------------------------------------


def data_part_type(event_type: str) -> str:
    """The ``data-*`` chunk type of an event type: ``"trade.executed"`` → ``"data-trade-executed"``.

    Each run of characters other than ASCII letters, digits, ``_`` and ``-``
    becomes one ``-`` (dashes at the ends are dropped; ``"event"`` if
    nothing is left), so the name is a plain identifier in any client.
    """
    return "data-" + (_NAME.sub("-", event_type).strip("-") or "event")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text_id(iteration: int) -> str:
    return f"text-{iteration}"


def _data(event: FlowEvent, *, part_id: str | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {"type": data_part_type(event.type)}
    if part_id is not None:
        chunk["id"] = part_id
    chunk["data"] = event.data
    return chunk


def _text(event: FlowEvent, delta: object) -> list[dict[str, Any]]:
    text = delta if isinstance(delta, str) else ""
    iteration = _int(event.data.get("iteration"))
    if iteration is not None:
        return [{"type": "text-delta", "id": _text_id(iteration), "delta": text}]
    # Not inside a model step (built by hand, coalesced): a text part of its own.
    part = f"text-e{event.seq}"
    return [
        {"type": "text-start", "id": part},
        {"type": "text-delta", "id": part, "delta": text},
        {"type": "text-end", "id": part},
    ]


def _step(event: FlowEvent, kind: str) -> list[dict[str, Any]]:
    iteration = _int(event.data.get("iteration"))
    if event.data.get("step") != "model" or iteration is None:
        return []
    return [{"type": kind, "id": _text_id(iteration)}]


def _tool_input(event: FlowEvent) -> list[dict[str, Any]]:
    call_id = str(event.data.get("call_id", ""))
    tool = str(event.data.get("tool", ""))
    raw = event.data.get("input")
    given = raw if isinstance(raw, Mapping) else {}
    common = {"toolCallId": call_id, "toolName": tool, "providerExecuted": True}
    if event.data.get("streamed") is True:  # the start and the deltas went out already
        return [{"type": "tool-input-available", **common, "input": given}]
    return [
        {"type": "tool-input-start", **common},
        {
            "type": "tool-input-delta",
            "toolCallId": call_id,
            "inputTextDelta": _encoder.encode(given),
        },
        {"type": "tool-input-available", **common, "input": given},
    ]


def _tool_input_delta(event: FlowEvent) -> list[dict[str, Any]]:
    call_id = str(event.data.get("call_id", ""))
    delta = event.data.get("delta")
    out: list[dict[str, Any]] = []
    if event.data.get("first") is True:
        tool = str(event.data.get("tool", ""))
        out.append(
            {
                "type": "tool-input-start",
                "toolCallId": call_id,
                "toolName": tool,
                "providerExecuted": True,
            }
        )
    if isinstance(delta, str) and delta:
        out.append({"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": delta})
    return out


def _error_text(error: object) -> str:
    if isinstance(error, Mapping):
        kind, message = error.get("type"), error.get("message")
        if kind and message:
            return f"{kind}: {message}"
        return str(message or kind or "error")
    return str(error) if error else "error"


def _finish(event: FlowEvent, status: str, reason: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {"status": status}
    if event.run_id:
        metadata["runId"] = event.run_id
    for key in ("iterations", "usage", "structured"):
        if key in event.data:
            metadata[key] = event.data[key]
    return {"type": "finish", "finishReason": reason, "messageMetadata": metadata}


def _started(event: FlowEvent) -> list[dict[str, Any]]:
    chunk: dict[str, Any] = {"type": "start"}
    metadata: dict[str, Any] = {}
    if event.run_id:
        chunk["messageId"] = event.run_id
        metadata["runId"] = event.run_id
    given = event.data.get("metadata")
    if isinstance(given, Mapping) and isinstance(given.get("thread_id"), str):
        metadata["threadId"] = given["thread_id"]
    if metadata:
        chunk["messageMetadata"] = metadata
    return [chunk]


def _completed(event: FlowEvent) -> list[dict[str, Any]]:
    reason = _FINISH_REASONS.get(str(event.data.get("stop_reason")), "other")
    return [_finish(event, "completed", reason)]


def _failed(event: FlowEvent) -> list[dict[str, Any]]:
    return [
        {"type": "error", "errorText": _error_text(event.data.get("error"))},
        _finish(event, "failed", "error"),
    ]


def _cancelled(event: FlowEvent) -> list[dict[str, Any]]:
    reason = str(event.data.get("reason", "cancelled"))
    if reason in _CLIENT_CANCELS:
        return [{"type": "abort", "reason": reason}, _finish(event, "cancelled", "other")]
    return [
        {"type": "error", "errorText": f"the run was cancelled: {reason}"},
        _finish(event, "cancelled", "error"),
    ]


def _warning(event: FlowEvent) -> list[dict[str, Any]]:
    discarded = _int(event.data.get("discarded_tokens"))
    iteration = _int(event.data.get("iteration"))
    calls = event.data.get("discarded_tool_calls")
    # A model retry voids the tool calls it had streamed: each ends as an input error.
    voided = [
        {
            "type": "tool-input-error",
            "toolCallId": str(call.get("call_id", "")),
            "toolName": str(call.get("tool", "")),
            "input": None,
            "providerExecuted": True,
            "errorText": "voided by a model retry: the turn streams again",
        }
        for call in (calls if isinstance(calls, list) else ())
        if isinstance(call, Mapping)
    ]
    if not discarded or discarded < 0 or iteration is None:
        return [*voided, _data(event)]
    # A model retry voids the text streamed so far: it stays a finished part
    # of its own, the warning after it, and the new attempt a new part.
    part = _text_id(iteration)
    return [
        {"type": "text-end", "id": part},
        *voided,
        _data(event),
        {"type": "text-start", "id": part},
    ]


def _iteration_failed(event: FlowEvent) -> list[dict[str, Any]]:
    # The failed model step never completed: its text part ends here.
    iteration = _int(event.data.get("iteration"))
    ended = [] if iteration is None else [{"type": "text-end", "id": _text_id(iteration)}]
    return [*ended, {"type": "finish-step"}]


def _call(event: FlowEvent) -> str:
    return str(event.data.get("call_id", ""))


_Mapper = Callable[[FlowEvent], list[dict[str, Any]]]

_MAPPERS: dict[str, _Mapper] = {
    EventType.FLOW_STARTED: _started,
    EventType.ITERATION_STARTED: lambda e: [{"type": "start-step"}],
    EventType.ITERATION_COMPLETED: lambda e: [{"type": "finish-step"}],
    EventType.ITERATION_FAILED: _iteration_failed,
    EventType.STEP_STARTED: lambda e: _step(e, "text-start"),
    EventType.STEP_COMPLETED: lambda e: _step(e, "text-end"),
    EventType.TOKEN_RECEIVED: lambda e: _text(e, e.data.get("token")),
    EventType.TOKEN_CHUNK: lambda e: _text(e, e.data.get("chunk")),
    EventType.WARNING: _warning,
    EventType.TOOL_INPUT_DELTA: _tool_input_delta,
    EventType.TOOL_STARTED: _tool_input,
    EventType.TOOL_APPROVAL_REQUIRED: lambda e: [
        # tool-input-start (unless the input streamed), tool-input-available
        *[c for c in _tool_input(e) if c["type"] != "tool-input-delta"],
        {"type": "tool-approval-request", "approvalId": _call(e), "toolCallId": _call(e)},
    ],
    EventType.TOOL_APPROVED: lambda e: [_data(e, part_id=_call(e))],
    EventType.TOOL_DENIED: lambda e: [{"type": "tool-output-denied", "toolCallId": _call(e)}],
    EventType.TOOL_PROGRESS: lambda e: [_data(e, part_id=_call(e))],
    EventType.TOOL_COMPLETED: lambda e: [
        {
            "type": "tool-output-available",
            "toolCallId": _call(e),
            "output": e.data.get("result"),
            "providerExecuted": True,
        }
    ],
    EventType.TOOL_FAILED: lambda e: [
        {
            "type": "tool-output-error",
            "toolCallId": _call(e),
            "errorText": _error_text(e.data.get("error")),
            "providerExecuted": True,
        }
    ],
    EventType.PROGRESS_UPDATE: lambda e: [_data(e, part_id="progress")],
    EventType.FLOW_COMPLETED: _completed,
    EventType.FLOW_FAILED: _failed,
    EventType.FLOW_CANCELLED: _cancelled,
}


def ui_message_chunks(event: FlowEvent) -> list[dict[str, Any]]:
    """The UI message stream chunks of one event (none, one or several), in order.

    A pure function of the event (see the module documentation for the
    mapping): the same event always gives the same chunks. ``[DONE]`` is
    not a chunk: :data:`VERCEL` adds it after a terminal event.
    """
    if event.type in _SILENT:
        return []
    mapper = _MAPPERS.get(event.type)
    if mapper is None:
        return [_data(event)]
    return mapper(event)


def _frame(event: FlowEvent) -> bytes:
    frames = [
        b"data: " + _encoder.encode(c).encode("ascii") + b"\n\n" for c in ui_message_chunks(event)
    ]
    if event.is_terminal():
        frames.append(_DONE)
    # The id goes on the group's last frame: a resume never splits an event's chunks.
    last = frames.pop() if frames else b"\n"
    frames.append(b"id: %d\n" % event.seq + last)
    return b"".join(frames)


def _error(code: str, message: str, details: dict[str, Any]) -> bytes:
    chunk = {"type": "error", "errorText": message, "code": code, **details}
    return b"data: " + _encoder.encode(chunk).encode("ascii") + b"\n\n" + _DONE


def _evicted(run_id: str, last_seq: int) -> bytes:
    return _error(
        EVICTED,
        f"this client fell behind and was disconnected; resume with Last-Event-ID: {last_seq}",
        {"last_seq": last_seq},
    )


VERCEL: Encoding[bytes, bytes] = Encoding(
    name="vercel",
    event=_frame,
    join=b"".join,
    evicted=_evicted,
    keepalive=KEEPALIVE.encode("ascii"),
)
"""One event's chunks as SSE frames (the last with ``id:``), ``[DONE]`` after the terminal event."""

VERCEL_FORMAT = StreamFormat(VERCEL, _HEADERS, lambda hub: b"", _error)
"""The UI message stream: its header, nothing first, errors as ``error`` chunks then ``[DONE]``."""


def _format_for(run_id: str) -> StreamFormat:
    """:data:`VERCEL_FORMAT` with the run's id in ``x-trioflow-run-id`` (same encoding: same cache)."""
    header = (b"x-trioflow-run-id", run_id.encode("latin-1", "replace"))
    return dataclasses.replace(VERCEL_FORMAT, headers=(*VERCEL_FORMAT.headers, header))


# -- chats and threads --------------------------------------------------------------------


class ChatThreads:
    """Which trioflow thread each chat id of a UI client is: the same answer on every node.

    A chat id that is a retained thread's id is that thread; any other is
    the thread ``chat_<digest>`` (the SHA-256 of the chat id, so any chat
    id makes a valid, fixed thread id), made with metadata ``{"chat_id": ...}``
    on the chat's first message. Nothing is kept beside the thread store:
    with Redis, a chat's next message may go to any node.

    Args:
        hub: the server's hub (its :attr:`~trioflow.web._runs.RunHub.threads`).
    """

    __slots__ = ("_hub",)

    def __init__(self, hub: RunHub) -> None:
        self._hub = hub

    @staticmethod
    def thread_id(chat_id: str) -> str:
        """The id of the thread a chat id (not itself a thread's id) is."""
        return "chat_" + hashlib.sha256(chat_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    async def find(self, chat_id: str) -> Thread | None:
        """The chat's thread, or ``None`` when there is none (or the store forgot it).

        Raises:
            Exception: what the thread store raises when it fails (Redis errors).
        """
        threads = self._hub.threads
        for thread_id in (chat_id, self.thread_id(chat_id)):
            try:
                return await threads.get_thread(thread_id)
            except ThreadNotFound:
                continue
        return None

    async def find_or_create(self, chat_id: str) -> Thread:
        """The chat's thread, made (with metadata ``{"chat_id": chat_id}``) when it has none.

        Raises:
            ThreadLimitReached: a new thread is needed and every retained one has a run going.
            Exception: what the thread store raises when it fails (Redis errors).
        """
        thread = await self.find(chat_id)
        if thread is not None:
            return thread
        return await self._hub.threads.create_thread(
            {"chat_id": chat_id}, thread_id=self.thread_id(chat_id)
        )


def chat_threads(hub: RunHub) -> ChatThreads:
    """The :class:`ChatThreads` of ``hub``."""
    return ChatThreads(hub)


# -- the request --------------------------------------------------------------------------

_CHAT_FIELDS = frozenset({"id", "messages", "trigger", "messageId"})
_MAX_CHAT_ID = 200
_CHAT_ID = re.compile(r"[^\x00-\x1f\x7f]+")


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _chat_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad("'id' must be the chat's id: a non-empty string")
    if len(value) > _MAX_CHAT_ID or _CHAT_ID.fullmatch(value) is None:
        raise _bad(f"'id' must have at most {_MAX_CHAT_ID} characters and no control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("'id' is not valid Unicode") from None
    return value


def _message_text(messages: object) -> str:
    """The text of the last message, which must be the user's (its ``text`` parts, joined)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of UI messages")
    last = messages[-1]
    if not isinstance(last, dict):
        raise _bad("'messages' must hold UI message objects")
    if last.get("role") != "user":
        raise _bad("the last of 'messages' must be the user's new message (role 'user')")
    parts = last.get("parts")
    if not isinstance(parts, list):
        raise _bad("the last message's 'parts' must be an array")
    texts: list[str] = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"part {i} of the last message must be an object with a 'type'")
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"part {i} of the last message is a text part without a string 'text'")
            texts.append(text)
    text = "\n".join(texts)
    if not text.strip():
        raise _bad("the last message has no text: send at least one non-empty text part")
    return text


def parse_chat(body: object) -> tuple[str, RunRequest]:
    """The chat id and the run request of a ``POST /vercel/chat`` body.

    Raises:
        ApiError: ``400`` ``invalid_request`` naming what is wrong: not an
            object, a bad ``id``, ``messages`` or ``trigger`` (only
            ``submit-message``: a thread cannot take back its last answer),
            a last message that is not the user's or has no text, a bad
            ``messageId``, or a run option :meth:`RunRequest.parse
            <trioflow.web.RunRequest.parse>` refuses (unknown field
            included).
    """
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object: {id, messages, trigger, messageId}")
    chat_id = _chat_id(body.get("id"))
    trigger = body.get("trigger", "submit-message")
    if trigger != "submit-message":
        raise _bad(
            f"'trigger' {trigger!r} is not supported: a chat is a trioflow thread, which "
            "keeps its answers; send a new message ('submit-message')"
        )
    message_id = body.get("messageId")
    if message_id is not None and not isinstance(message_id, str):
        raise _bad("'messageId' must be a string")
    text = _message_text(body.get("messages"))
    options = {key: value for key, value in body.items() if key not in _CHAT_FIELDS}
    try:
        request = RunRequest.parse({**options, "task": text})
    except ValueError as exc:
        raise _bad(str(exc).replace("'task'", "the last message's text")) from None
    return chat_id, request


# -- endpoints ----------------------------------------------------------------------------


def _hub(request: Request) -> RunHub:
    return cast("RunHub", request.app.state.trioflow)


async def vercel_chat(request: Request) -> Response:
    """``POST /vercel/chat``: the chat's next run (its thread's), answered with its UI message stream.

    Raises:
        ApiError: the errors of reading a JSON body (``415``, ``413``,
            ``400``, ``408``), of :func:`parse_chat` (``400``), ``503``
            while shutting down, ``429`` ``too_many_threads`` (a new
            thread is needed and all have a run going), and those of
            :meth:`RunHub.start <trioflow.web._runs.RunHub.start>`
            (``409`` ``thread_busy``/``thread_full``, ``429``, ``400``).
    """
    hub = _hub(request)
    if hub.closing:
        raise ApiError(503, "shutting_down", "the server is shutting down; no new runs")
    try:
        body = await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout)
    except ApiError as exc:
        if exc.status != 413:
            raise
        raise ApiError(
            413,
            exc.code,
            f"{exc.message}: send only the new message (the transport's "
            "prepareSendMessagesRequest); the chat's thread holds the rest",
        ) from None
    chat_id, run_request = parse_chat(body)
    chats = chat_threads(hub)
    for attempt in (1, 2):
        try:
            thread = await chats.find_or_create(chat_id)
        except ThreadLimitReached as exc:
            raise ApiError(
                429, "too_many_threads", str(exc), headers={"Retry-After": "1"}
            ) from None
        except Exception as exc:  # the thread store (Redis) failed
            raise store_unavailable(exc) from None
        try:
            run = await hub.start(run_request, source="vercel", thread=thread)
            break
        except ApiError as exc:
            # Another chat's first message made room by forgetting this idle thread
            # between the two steps: made again, once.
            if exc.code != "thread_not_found" or attempt == 2:
                raise
    return EventStreamResponse(hub, run, 0, fmt=_format_for(run.run_id))


async def vercel_chat_stream(request: Request) -> Response:
    """``GET /vercel/chat/{chat_id}/stream``: the chat's running run, from its start or ``Last-Event-ID``.

    ``204`` when the chat has no run going; with ``Last-Event-ID``, the
    rest of its latest run when something is left of it.

    Raises:
        ApiError: ``400`` ``invalid_after`` (a bad ``Last-Event-ID``),
            ``404`` ``run_not_found`` (the run was forgotten).
    """
    hub = _hub(request)
    try:
        thread = await chat_threads(hub).find(request.path_params["chat_id"])
    except Exception as exc:  # the thread store (Redis) failed
        raise store_unavailable(exc) from None
    run_id = None if thread is None else thread.running
    if run_id is None and thread is not None and thread.runs:
        resuming = request.headers.get("last-event-id", "").strip() or request.query_params.get(
            "after"
        )
        if resuming:
            run_id = thread.runs[-1]
    if run_id is None:
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    await hub.resolve(run_id)
    answer = event_stream_answer(hub, None, request.scope, run_id)
    if isinstance(answer, Response):
        return answer
    return EventStreamResponse(hub, *answer, fmt=_format_for(run_id))


async def run_vercel(request: Request) -> Response:
    """``GET /runs/{run_id}/events.vercel``: the run as a UI message stream (resume as the event stream).

    Raises:
        ApiError: ``404`` ``run_not_found``, ``400`` ``invalid_after``.
    """
    hub = _hub(request)
    # The access rules were applied by the middleware (AccessControl).
    run_id = request.path_params["run_id"]
    answer = event_stream_answer(hub, None, request.scope, run_id)
    if isinstance(answer, Response):
        return answer
    return EventStreamResponse(hub, *answer, fmt=_format_for(run_id))


# -- a chat's messages, for a page that loads them -------------------------------------------


def _output(content: str) -> Any:
    """A tool result as the stream sent it: the JSON value its text is, else the text."""
    try:
        return json.loads(content)
    except ValueError:
        return content


def ui_messages(thread: Thread) -> list[dict[str, Any]]:
    """The thread's conversation as ``useChat``'s UI messages (the shape ``readUIMessageStream`` builds).

    One UI message per user message (its text part) and one per assistant
    turn, i.e. the model turns and tool results between two user messages:
    a ``step-start`` part per model turn, its text (``state: "done"``),
    its tool calls as ``tool-<name>`` parts with their input and, from the
    tool results, ``output-available`` (the result as JSON when it is
    JSON) or ``output-error``. Ids are ``<thread id>-<index>``; what the
    live stream carried beside (progress and custom ``data-*`` parts) is
    not kept in a thread. Raises nothing.
    """
    out: list[dict[str, Any]] = []
    assistant: dict[str, Any] | None = None
    tools: dict[str, dict[str, Any]] = {}
    for index, message in enumerate(thread.messages):
        results = [b for b in message.content if isinstance(b, ToolResultBlock)]
        if message.role == "user" and not results:
            assistant = None
            text = "".join(b.text for b in message.content if isinstance(b, TextBlock))
            out.append(
                {
                    "id": f"{thread.thread_id}-{index}",
                    "role": "user",
                    "parts": [{"type": "text", "text": text}],
                }
            )
            continue
        if assistant is None:
            assistant = {
                "id": f"{thread.thread_id}-{index}",
                "role": "assistant",
                "metadata": {"threadId": thread.thread_id},
                "parts": [],
            }
            out.append(assistant)
        parts: list[dict[str, Any]] = assistant["parts"]
        if message.role == "assistant":
            parts.append({"type": "step-start"})
        for block in message.content:
            if isinstance(block, TextBlock) and block.text:
                parts.append({"type": "text", "text": block.text, "state": "done"})
            elif isinstance(block, ToolUseBlock):
                part = {
                    "type": f"tool-{block.name}",
                    "toolCallId": block.id,
                    "state": "input-available",
                    "input": dict(block.input),
                    "providerExecuted": True,
                }
                tools[block.id] = part
                parts.append(part)
            elif isinstance(block, ToolResultBlock):
                called = tools.get(block.tool_use_id)
                if called is None:
                    continue
                if block.is_error:
                    called.update(state="output-error", errorText=block.content)
                else:
                    called.update(state="output-available", output=_output(block.content))
    return out


async def vercel_chat_messages(request: Request) -> Response:
    """``GET /vercel/chat/{chat_id}/messages``: the chat's conversation as UI messages.

    For a page that reloads: ``useChat({id, messages})`` starts from them.
    ``{"id": chat_id, "messages": [...]}`` (:func:`ui_messages`); an
    unknown chat has none.

    Raises:
        ApiError: ``503`` ``store_unavailable`` when the thread store fails.
    """
    hub = _hub(request)
    chat_id = request.path_params["chat_id"]
    try:
        thread = await chat_threads(hub).find(chat_id)
    except Exception as exc:  # the thread store (Redis) failed
        raise store_unavailable(exc) from None
    messages = [] if thread is None else ui_messages(thread)
    return JSONResponse({"id": chat_id, "messages": messages})
