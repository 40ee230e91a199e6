"""AG-UI: a run's events as the `AG-UI <https://docs.ag-ui.com>`_ event stream.

Two endpoints speak it (see :doc:`/howto/agui` for the whole mapping):

* ``POST /agui`` takes AG-UI's ``RunAgentInput`` (what ``@ag-ui/client``'s
  ``HttpAgent`` sends), starts a run (:func:`parse_run_input` says how the
  input becomes a :class:`~trioflow.web.RunRequest`) and answers with the
  run's AG-UI stream;
* ``GET /runs/{id}/events.agui`` streams any run (started by ``POST
  /agui``, ``POST /runs``, a thread, ...) the same way, from a resume point
  (``Last-Event-ID`` or ``?after=``), with the access rules, the ``204``
  and the flow control of ``GET /runs/{id}/events`` (:mod:`trioflow.web._sse`).

The wire is Server-Sent Events: each AG-UI event one ``data: {json}``
frame, field names in camelCase as the protocol has them. One trioflow event
becomes zero or more AG-UI events (:func:`agui_events`); the **last** frame
of that group carries ``id: <seq>``, the trioflow event's seq, so a client
resuming with ``Last-Event-ID`` never gets half a group. A stream error
(``evicted``, ``history_expired``) is a ``RUN_ERROR`` frame with that
``code`` and no ``id:``; silence is broken by a ``: keepalive`` comment.

Ids
    AG-UI's ``threadId`` and ``runId`` are the client's: ``POST /agui``
    keeps them with the run (its ``metadata``: ``agui_thread_id`` is the
    ``threadId``, ``agui_run_id`` the ``runId``) and ``RUN_STARTED``,
    ``RUN_FINISHED`` carry them. A run started some other way has
    ``runId`` = its trioflow run id, and ``threadId`` = its thread's id, or
    its run id when it has no thread. Message ids are made from the trioflow
    run id and the iteration (``<run_id>:msg:<iteration>``), tool result
    ids from the tool call id (``<run_id>:result:<call_id>``); a tool call's
    ``toolCallId`` is trioflow's ``call_id``.

Encoded once
    The frames of a run are a function of the event and of the run's AG-UI
    ids (fixed when the run starts), nothing else: they are encoded once per
    run in the run's :class:`~trioflow.web._streams.FrameCache` and shared by
    every connection, like the other formats.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.responses import Response

from trioflow._json import json_type
from trioflow.events import EventType, FlowEvent, _json_default
from trioflow.handle import RunHandle as Run
from trioflow.models._base import ContentBlock, Message, TextBlock, ToolResultBlock, ToolUseBlock
from trioflow.protocol import EVICTED
from trioflow.requests import RunRequest
from trioflow.sse import encode
from trioflow.web._body import read_json
from trioflow.web._errors import ApiError
from trioflow.web._sse import EventStreamResponse, StreamFormat, event_stream_answer
from trioflow.web._streams import Encoding

if TYPE_CHECKING:
    from trioflow.web._runs import RunHub

__all__ = [
    "AGUI_HEADERS",
    "AguiIds",
    "AguiInput",
    "agui_encoding",
    "agui_events",
    "agui_format",
    "agui_ids",
    "parse_run_input",
    "run_agui",
    "start_agui",
]

AGUI_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)
"""The AG-UI stream's response headers."""

_KEEPALIVE = encode(comment="keepalive").encode("ascii")
_APPROVAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "decision": {"enum": ["approve", "deny", "edit"]},
        "reason": {"type": "string"},
        "input": {"type": "object"},
    },
    "required": ["decision"],
}
"""What ``POST /runs/{id}/approvals/{call_id}`` takes: the interrupt's ``responseSchema``."""


# -- ids --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AguiIds:
    """The AG-UI ``threadId`` and ``runId`` of one trioflow run (fixed when it starts)."""

    thread_id: str
    """AG-UI's ``threadId``."""
    run_id: str
    """AG-UI's ``runId``."""


def agui_ids(run: Run) -> AguiIds:
    """The AG-UI ids of ``run``: the client's for a run ``POST /agui`` started, else trioflow's.

    ``threadId`` is the run's ``metadata["agui_thread_id"]`` (the AG-UI
    ``threadId`` of a ``POST /agui`` run), else ``metadata["thread_id"]`` (the thread of a thread's run),
    else the run id; ``runId`` is ``metadata["agui_run_id"]``, else the run
    id. Raises nothing.
    """
    metadata: Mapping[str, Any] = run.to_dict().get("metadata") or {}
    thread_id = metadata.get("agui_thread_id") or metadata.get("thread_id")
    agui_run_id = metadata.get("agui_run_id")
    return AguiIds(
        thread_id if isinstance(thread_id, str) and thread_id else run.run_id,
        agui_run_id if isinstance(agui_run_id, str) and agui_run_id else run.run_id,
    )


def _message_id(event: FlowEvent, iteration: object) -> str:
    return f"{event.run_id}:msg:{iteration}"


# -- the mapping ------------------------------------------------------------------------


_encoder = json.JSONEncoder(separators=(",", ":"), default=_json_default, allow_nan=False)


def _finite(value: object) -> object:
    """``value`` with every NaN and infinity replaced by its text (as the agent does for results)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_finite(item) for item in value]
    return value


def _dumps(value: object) -> str:
    """Compact ASCII JSON; a NaN or an infinity becomes its text rather than failing the stream."""
    try:
        return _encoder.encode(value)
    except ValueError:
        return _encoder.encode(_finite(value))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _dumps(value)


def _usage(usage: object) -> list[dict[str, int]] | None:
    if not isinstance(usage, Mapping):
        return None
    entry = {
        camel: value
        for key, camel in (
            ("input_tokens", "inputTokens"),
            ("output_tokens", "outputTokens"),
            ("total_tokens", "totalTokens"),
        )
        if isinstance(value := usage.get(key), int) and not isinstance(value, bool) and value >= 0
    }
    return [entry] if entry else None


def _custom(event: FlowEvent, value: Any = None) -> dict[str, Any]:
    return {"type": "CUSTOM", "name": event.type, "value": event.data if value is None else value}


def _step_name(data: Mapping[str, Any]) -> str:
    step = str(data.get("step", "step"))
    iteration = data.get("iteration")
    return step if iteration is None else f"{step} {iteration}"


def _tool_call_start(event: FlowEvent, data: Mapping[str, Any], call_id: str) -> dict[str, Any]:
    return {
        "type": "TOOL_CALL_START",
        "toolCallId": call_id,
        "toolCallName": str(data.get("tool")),
        "parentMessageId": _message_id(event, data.get("iteration")),
    }


def agui_events(event: FlowEvent, ids: AguiIds) -> list[dict[str, Any]]:
    """The AG-UI events (JSON objects, camelCase) ``event`` becomes, in order; maybe none.

    A pure function of ``event`` and ``ids``: each event of a run is encoded
    once. The mapping (the table of :doc:`/howto/agui`):

    * ``flow.started`` → ``RUN_STARTED`` (its ``metadata.trioflow.runId``:
      the trioflow run id); ``flow.completed`` → ``RUN_FINISHED``
      (``result``: the ``structured`` answer, else the ``output`` text;
      ``usage``); ``flow.failed`` → ``RUN_ERROR`` (``code``: the failure's
      ``reason``, else the error's type); ``flow.cancelled`` → ``RUN_ERROR``
      with ``code`` ``"cancelled"``;
    * ``iteration.started`` → ``STEP_STARTED`` ``"iteration <n>"``,
      ``iteration.completed``/``failed`` → its ``STEP_FINISHED``; the
      ``tools`` step (and any other named step but ``model``) likewise
      (``"tools <n>"``);
    * the ``model`` step is the assistant's message of that iteration:
      ``step.started`` → ``TEXT_MESSAGE_START``, each ``token.received`` (or
      ``token.chunk`` with an ``iteration``) → ``TEXT_MESSAGE_CONTENT``
      (empty ones dropped), ``step.completed`` → ``TEXT_MESSAGE_END``;
    * ``tool.input_delta`` (a model streaming a call's input) → on the
      call's ``first`` delta ``TOOL_CALL_START`` (its ``parentMessageId`` the
      iteration's message, still open: AG-UI lets a tool call start inside
      the message that carries it), then ``TOOL_CALL_ARGS`` for each
      non-empty ``delta``; ``tool.started`` with ``streamed`` →
      ``TOOL_CALL_END``; ``tool.denied`` with ``streamed`` → ``TOOL_CALL_END``
      and the ``CUSTOM`` event; a model retry's ``warning`` with
      ``discarded_tool_calls`` → ``TOOL_CALL_END`` for each, then the
      ``CUSTOM`` event;
    * ``tool.started`` of a call whose input was not streamed →
      ``TOOL_CALL_START``, ``TOOL_CALL_ARGS`` (the whole input as **one**
      delta), ``TOOL_CALL_END``;
      ``tool.completed`` → ``TOOL_CALL_RESULT`` (a string result as it is,
      any other as JSON); ``tool.failed`` → ``TOOL_CALL_RESULT`` whose
      content is the error;
    * ``tool.approval_required`` → ``CUSTOM`` whose ``value`` is the event's
      data plus ``decide`` (the path to ``POST`` the decision to) and
      ``interrupt``, an AG-UI ``Interrupt`` object (``id`` and
      ``toolCallId``: the call id, ``reason`` ``"tool_approval"``,
      ``responseSchema``: what ``POST /runs/{id}/approvals/{call_id}``
      takes) — not a ``RUN_FINISHED`` interrupt outcome (see the how-to);
    * ``add_message`` → nothing (the client builds its messages from the
      streamed ones); every other event (``progress.update``,
      ``tool.progress``, ``tool.approved``, ``tool.denied``, warnings,
      custom types, ...) → ``CUSTOM`` named by its type, its data as ``value``.

    Every AG-UI event has ``timestamp`` (milliseconds). Raises nothing.
    """
    data = event.data
    kind = event.type
    out: list[dict[str, Any]]
    if kind == EventType.FLOW_STARTED:
        out = [
            {
                "type": "RUN_STARTED",
                "threadId": ids.thread_id,
                "runId": ids.run_id,
                "metadata": {"trioflow": {"runId": event.run_id}},
            }
        ]
    elif kind == EventType.FLOW_COMPLETED:
        finished: dict[str, Any] = {
            "type": "RUN_FINISHED",
            "threadId": ids.thread_id,
            "runId": ids.run_id,
        }
        result = data["structured"] if "structured" in data else data.get("output")
        if result is not None:  # the protocol leaves an absent optional out, never null
            finished["result"] = result
        usage = _usage(data.get("usage"))
        if usage is not None:
            finished["usage"] = usage
        out = [finished]
    elif kind == EventType.FLOW_FAILED:
        error = data.get("error")
        error = error if isinstance(error, Mapping) else {}
        code = data.get("reason") or error.get("type") or "failed"
        message = error.get("message") or "the run failed"
        out = [{"type": "RUN_ERROR", "message": str(message), "code": str(code)}]
    elif kind == EventType.FLOW_CANCELLED:
        reason = data.get("reason") or "cancelled"
        out = [
            {
                "type": "RUN_ERROR",
                "message": f"the run was cancelled ({reason})",
                "code": "cancelled",
            }
        ]
    elif kind == EventType.ITERATION_STARTED:
        out = [{"type": "STEP_STARTED", "stepName": f"iteration {data.get('iteration')}"}]
    elif kind in (EventType.ITERATION_COMPLETED, EventType.ITERATION_FAILED):
        out = [{"type": "STEP_FINISHED", "stepName": f"iteration {data.get('iteration')}"}]
    elif kind == EventType.STEP_STARTED:
        if data.get("step") == "model":
            message_id = _message_id(event, data.get("iteration"))
            out = [{"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"}]
        else:
            out = [{"type": "STEP_STARTED", "stepName": _step_name(data)}]
    elif kind == EventType.STEP_COMPLETED:
        if data.get("step") == "model":
            out = [
                {"type": "TEXT_MESSAGE_END", "messageId": _message_id(event, data.get("iteration"))}
            ]
        else:
            out = [{"type": "STEP_FINISHED", "stepName": _step_name(data)}]
    elif kind in (EventType.TOKEN_RECEIVED, EventType.TOKEN_CHUNK):
        delta = data.get("token", data.get("chunk"))
        if "iteration" not in data:
            out = [_custom(event)]
        elif not isinstance(delta, str) or not delta:
            out = []
        else:
            message_id = _message_id(event, data["iteration"])
            out = [{"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": delta}]
    elif kind == EventType.TOOL_INPUT_DELTA:
        call_id = str(data.get("call_id"))
        delta = data.get("delta")
        out = []
        if data.get("first") is True:
            out.append(_tool_call_start(event, data, call_id))
        if isinstance(delta, str) and delta:
            out.append({"type": "TOOL_CALL_ARGS", "toolCallId": call_id, "delta": delta})
    elif kind == EventType.TOOL_STARTED:
        call_id = str(data.get("call_id"))
        if data.get("streamed") is True:  # START and ARGS went out with its tool.input_delta
            out = [{"type": "TOOL_CALL_END", "toolCallId": call_id}]
        else:
            out = [
                _tool_call_start(event, data, call_id),
                {
                    "type": "TOOL_CALL_ARGS",
                    "toolCallId": call_id,
                    "delta": _dumps(data.get("input")),
                },
                {"type": "TOOL_CALL_END", "toolCallId": call_id},
            ]
    elif kind in (EventType.TOOL_COMPLETED, EventType.TOOL_FAILED):
        call_id = str(data.get("call_id"))
        if kind == EventType.TOOL_COMPLETED:
            content = _text(data.get("result"))
        else:
            error = data.get("error")
            error = error if isinstance(error, Mapping) else {}
            content = f"{error.get('type', 'Error')}: {error.get('message', '')}"
        out = [
            {
                "type": "TOOL_CALL_RESULT",
                "messageId": f"{event.run_id}:result:{call_id}",
                "toolCallId": call_id,
                "content": content,
                "role": "tool",
            }
        ]
    elif kind == EventType.TOOL_APPROVAL_REQUIRED:
        call_id = str(data.get("call_id"))
        interrupt = {
            "id": call_id,
            "reason": "tool_approval",
            "message": f"approve the call of {data.get('tool')!s}?",
            "toolCallId": call_id,
            "responseSchema": copy.deepcopy(_APPROVAL_SCHEMA),
        }
        decide = f"/runs/{event.run_id}/approvals/{call_id}"
        out = [_custom(event, {**data, "decide": decide, "interrupt": interrupt})]
    elif kind == EventType.ADD_MESSAGE:
        out = []
    elif kind == EventType.TOOL_DENIED and data.get("streamed") is True:
        out = [{"type": "TOOL_CALL_END", "toolCallId": str(data.get("call_id"))}, _custom(event)]
    elif kind == EventType.WARNING and isinstance(data.get("discarded_tool_calls"), list):
        # A model retry voids the calls it had streamed: they end here, unrun.
        out = [
            {"type": "TOOL_CALL_END", "toolCallId": str(call.get("call_id"))}
            for call in data["discarded_tool_calls"]
            if isinstance(call, Mapping)
        ]
        out.append(_custom(event))
    else:
        out = [_custom(event)]
    if math.isfinite(event.timestamp):
        stamp = int(event.timestamp * 1000)
        for item in out:
            item["timestamp"] = stamp
    return out


def _frames(event: FlowEvent, ids: AguiIds) -> bytes:
    """The SSE frames of ``event``: one per AG-UI event, ``id: <seq>`` on the last one."""
    items = agui_events(event, ids)
    if not items:
        return b""
    parts = [f"data: {_dumps(item)}\n\n" for item in items]
    parts[-1] = f"id: {event.seq}\n{parts[-1]}"
    return "".join(parts).encode("ascii")


def _error_frame(code: str, message: str, details: Mapping[str, Any]) -> bytes:
    item: dict[str, Any] = {"type": "RUN_ERROR", "message": message, "code": code}
    if details:
        item["rawEvent"] = {"code": code, **details}
    return f"data: {_dumps(item)}\n\n".encode("ascii")


def _evicted(run_id: str, last_seq: int) -> bytes:
    return _error_frame(
        EVICTED,
        f"this client fell behind and was disconnected; resume with Last-Event-ID: {last_seq}",
        {"last_seq": last_seq},
    )


def agui_encoding(ids: AguiIds) -> Encoding[bytes, bytes]:
    """The ``"agui"`` :class:`~trioflow.web._streams.Encoding` of a run whose AG-UI ids are ``ids``.

    Every encoding of one run is the same (its ids never change), so the
    run's frame cache and fan-out, keyed by the name, are shared. Raises
    nothing.
    """
    return Encoding(
        name="agui",
        event=lambda event: _frames(event, ids),
        join=b"".join,
        evicted=_evicted,
        keepalive=_KEEPALIVE,
    )


def agui_format(run: Run) -> StreamFormat:
    """The AG-UI :class:`~trioflow.web._sse.StreamFormat` of ``run``: its frames, headers, errors.

    Nothing is sent first; a stream error is a ``RUN_ERROR`` frame with its
    ``code`` and no ``id:`` (the error's details in ``rawEvent``). Raises nothing.
    """
    return StreamFormat(agui_encoding(agui_ids(run)), AGUI_HEADERS, lambda hub: b"", _error_frame)


# -- RunAgentInput ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AguiInput:
    """A validated ``RunAgentInput``: what a trioflow run is made of."""

    thread_id: str
    """The client's ``threadId``."""
    run_id: str
    """The client's ``runId``."""
    request: RunRequest
    """The run to start: the last user message as its task, the system
    messages as its ``system``, ``forwardedProps.trioflow`` as its options."""
    history: tuple[Message, ...]
    """The conversation before the last user message, as trioflow messages."""


_INPUT_FIELDS = frozenset(
    {
        "threadId",
        "runId",
        "parentRunId",
        "protocolVersion",
        "state",
        "messages",
        "tools",
        "context",
        "forwardedProps",
        "resume",
    }
)
_REQUEST_OPTIONS = frozenset(
    {
        "timeout",
        "max_iterations",
        "on_disconnect",
        "model",
        "max_tokens",
        "temperature",
        "metadata",
    }
)


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key} must be a non-empty string, not {json_type(value)}")
    return value


def _content_text(content: object, where: str) -> str:
    """A message's text: a string, or the ``text`` parts of a parts array (other parts refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or an array of parts")
    texts: list[str] = []
    for i, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise ValueError(
                f"{where}.content[{i}] must be a text part ({{'type': 'text', 'text': ...}}): "
                "this server takes text only"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}.content[{i}].text must be a string")
        texts.append(text)
    return "".join(texts)


def _tool_uses(calls: object, where: str) -> list[ContentBlock]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise ValueError(f"{where}.toolCalls must be an array, not {json_type(calls)}")
    blocks: list[ContentBlock] = []
    for i, call in enumerate(calls):
        at = f"{where}.toolCalls[{i}]"
        if not isinstance(call, Mapping):
            raise ValueError(f"{at} must be an object, not {json_type(call)}")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"{at}.function must be an object ({{'name', 'arguments'}})")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise ValueError(f"{at}.function.arguments must be a JSON string")
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ValueError(f"{at}.function.arguments is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{at}.function.arguments must encode a JSON object")
        blocks.append(
            ToolUseBlock(
                _string(call, "id", at), _string(function, "name", f"{at}.function"), parsed
            )
        )
    return blocks


def _conversation(messages: object) -> tuple[list[Message], list[str], str]:
    """The trioflow messages before the last user message, the system texts, and the task."""
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be an array, not {json_type(messages)}")
    turns: list[Message] = []
    system: list[str] = []

    def add(role: str, blocks: Sequence[ContentBlock]) -> None:
        if not blocks:
            return
        if turns and turns[-1].role == role:
            turns[-1] = Message(turns[-1].role, (*turns[-1].content, *blocks))
        else:
            turns.append(Message(cast("Any", role), tuple(blocks)))

    last_user: int | None = None
    for i, message in enumerate(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            last_user = i
    if last_user is None or last_user != len(messages) - 1:
        raise ValueError("the last of 'messages' must be the user's message: the task")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object, not {json_type(message)}")
        _string(message, "id", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_content_text(message.get("content"), where))
        elif role == "user":
            text = _content_text(message.get("content"), where)
            if i == last_user:
                if not text.strip():
                    raise ValueError(f"{where}.content must not be empty: it is the task")
                return turns, system, text
            add("user", [TextBlock(text)] if text else [])
        elif role == "assistant":
            text = _content_text(message.get("content"), where)
            add(
                "assistant",
                [
                    *([TextBlock(text)] if text else []),
                    *_tool_uses(message.get("toolCalls"), where),
                ],
            )
        elif role == "tool":
            call_id = _string(message, "toolCallId", where)
            text = _content_text(message.get("content"), where)
            error = message.get("error")
            if error is not None and not isinstance(error, str):
                raise ValueError(f"{where}.error must be a string")
            add("user", [ToolResultBlock(call_id, error or text, is_error=bool(error))])
        elif role in ("activity", "reasoning"):
            continue  # the UI's own: not the model's conversation
        else:
            raise ValueError(
                f"{where}.role must be 'user', 'assistant', 'system', 'developer', 'tool', "
                f"'activity' or 'reasoning', not {role!r}"
            )
    raise AssertionError("unreachable")  # pragma: no cover


def parse_run_input(obj: object) -> AguiInput:
    """Validate an AG-UI ``RunAgentInput`` (decoded JSON) and make the trioflow run of it.

    * ``threadId`` and ``runId``: non-empty strings, kept with the run;
    * ``messages``: the last must be the user's (its text is the task); the
      turns before it (user, assistant with ``toolCalls``, tool results)
      are the conversation the model sees first; ``system`` and
      ``developer`` messages, joined, replace the agent's system prompt;
      ``activity`` and ``reasoning`` messages are skipped; content is text
      (a string, or ``text`` parts);
    * ``forwardedProps.trioflow`` (an object, optional): the run's options,
      as in ``POST /runs``: ``timeout``, ``max_iterations``,
      ``on_disconnect``, ``model``, ``max_tokens``, ``temperature``,
      ``metadata``;
    * ``tools``, ``context`` (arrays), ``state`` and the rest of
      ``forwardedProps``: accepted and not used (the agent's own tools run
      on the server); ``resume``: refused when not empty (trioflow's
      approvals are decided on ``POST /runs/{id}/approvals/{call_id}``).

    Raises:
        ValueError: the input is not of that shape; the message names the member at fault.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a RunAgentInput JSON object, not {json_type(obj)}")
    unknown = sorted(set(obj) - _INPUT_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_INPUT_FIELDS))}"
        )
    thread_id = _string(obj, "threadId", "RunAgentInput")
    run_id = _string(obj, "runId", "RunAgentInput")
    for key in ("threadId", "runId"):
        if len(obj[key]) > 200:
            raise ValueError(f"RunAgentInput.{key} may have at most 200 characters")
    for key in ("tools", "context"):
        if obj.get(key) is not None and not isinstance(obj[key], list):
            raise ValueError(f"'{key}' must be an array, not {json_type(obj[key])}")
    if obj.get("resume"):
        raise ValueError(
            "'resume' is not supported: decide a tool call waiting for approval with "
            "POST /runs/{run_id}/approvals/{call_id}"
        )
    props = obj.get("forwardedProps")
    options: Mapping[str, Any] = {}
    if isinstance(props, Mapping) and props.get("trioflow") is not None:
        given = props["trioflow"]
        if not isinstance(given, Mapping):
            raise ValueError(f"'forwardedProps.trioflow' must be an object, not {json_type(given)}")
        bad = sorted(set(given) - _REQUEST_OPTIONS)
        if bad:
            raise ValueError(
                f"unknown field{'s' if len(bad) > 1 else ''} of forwardedProps.trioflow "
                f"{', '.join(map(repr, bad))}; allowed: {', '.join(sorted(_REQUEST_OPTIONS))}"
            )
        options = given
    history, system, task = _conversation(obj.get("messages"))
    metadata = options.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(
            f"'forwardedProps.trioflow.metadata' must be an object, not {json_type(metadata)}"
        )
    body: dict[str, Any] = {
        **options,
        "task": task,
        "metadata": {**(metadata or {}), "agui_thread_id": thread_id, "agui_run_id": run_id},
    }
    if system:
        body["system"] = "\n\n".join(system)
    request = RunRequest.parse(body)
    return AguiInput(thread_id, run_id, request, tuple(history))


# -- the endpoints ----------------------------------------------------------------------


def _hub(request: Request) -> RunHub:
    return cast("RunHub", request.app.state.trioflow)


async def start_agui(request: Request) -> Response:
    """``POST /agui``: start a run from a ``RunAgentInput``; answer with its AG-UI stream.

    Raises:
        ApiError: ``400`` ``invalid_request`` (the input, see
            :func:`parse_run_input`), and what ``POST /runs`` answers:
            ``415``, ``413``, ``400`` ``invalid_json``, ``429``, ``503``, ``409``
            ``thread_full`` (more earlier messages than a thread holds).
    """
    hub = _hub(request)
    if hub.closing:
        raise ApiError(503, "shutting_down", "the server is shutting down; no new runs")
    body = await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout)
    try:
        parsed = parse_run_input(body)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    # The conversation is the client's (it sends it whole with every run): it
    # goes with the run (to its worker, when queued), in no thread of the server.
    if len(parsed.history) + 1 > hub.config.max_thread_messages:
        limit = hub.config.max_thread_messages
        raise ApiError(
            409,
            "thread_full",
            f"the conversation has more than the {limit} messages a thread holds",
            limit=limit,
        )
    run = await hub.start(parsed.request, source="agui", messages=parsed.history)
    return EventStreamResponse(hub, run, 0, fmt=agui_format(run))


async def run_agui(request: Request) -> Response:
    """``GET /runs/{run_id}/events.agui``: the run's AG-UI stream from ``Last-Event-ID`` / ``?after=``.

    Raises:
        ApiError: as ``GET /runs/{run_id}/events``: ``404`` ``run_not_found``,
            ``400`` ``invalid_after``.
    """
    hub = _hub(request)
    # The access rules were applied by the middleware (AccessControl).
    answer = event_stream_answer(hub, None, request.scope, request.path_params["run_id"])
    if isinstance(answer, Response):
        return answer
    run, after = answer
    return EventStreamResponse(hub, run, after, fmt=agui_format(run))
