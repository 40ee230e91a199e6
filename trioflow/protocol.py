"""What the server and its clients agree on: event names on the wire, error codes, error data.

Defined once here, used by the server (:mod:`trioflow.web`), the clients
(:mod:`trioflow.client`) and :meth:`~trioflow.StreamingFlowExecutor.stream_sse`:

* :data:`ERROR_EVENT`, the SSE name of the stream's own error reports, and
  :data:`RENAMED_EVENTS`, the event types sent under another SSE name
  (:func:`event_name`); :func:`encode_event` and :func:`encode_error` make
  the frames (with :mod:`trioflow.sse`).
* The error codes of the stream: :data:`EVICTED`, :data:`HISTORY_EXPIRED`,
  and which of them a client recovers from by reconnecting
  (:data:`RESUMABLE_CODES`).
* :func:`error_info`: the ``{"type", "message"}`` of an exception, as event
  data carries it (``flow.failed``, ``tool.failed``, ...).

It imports nothing of trioflow but :mod:`trioflow.sse`, so every layer can use it.
"""

from __future__ import annotations

import json
from typing import Any, Final, NotRequired, Protocol, TypedDict

from trioflow.sse import encode, event_frame

__all__ = [
    "ERROR_EVENT",
    "EVICTED",
    "HISTORY_EXPIRED",
    "RENAMED_EVENTS",
    "RESUMABLE_CODES",
    "ErrorInfo",
    "WireEvent",
    "encode_error",
    "encode_event",
    "error_info",
    "event_name",
]

ERROR_EVENT: Final = "trioflow.error"
"""The SSE event name of errors of the stream itself (not of the run); its data is
``{"code", "message", ...}``. The ``trioflow.`` prefix is reserved for the server."""

RENAMED_EVENTS: Final[dict[str, str]] = {"error": "run.error", "open": "run.open"}
"""Event types sent under another SSE name, because ``EventSource`` uses their names itself."""

EVICTED: Final = "evicted"
"""Error code: the client fell behind by more than its buffer and was disconnected
(``last_seq`` is the last event it was sent); reconnecting resumes with no gap."""

HISTORY_EXPIRED: Final = "history_expired"
"""Error code: the resume point is older than the retained history
(``requested``, ``first_available``); resuming cannot be gapless."""

RESUMABLE_CODES: Final = frozenset({EVICTED})
"""Error codes after which the server expects the client to reconnect and resume."""


class ErrorInfo(TypedDict):
    """An error as events and error frames carry it: never a traceback."""

    type: str
    """The exception's class name."""
    message: str
    """Its message."""
    kind: NotRequired[str]
    """For a :exc:`~trioflow.models.ModelError`: its kind (``"overloaded"``, ...)."""


class WireEvent(Protocol):
    """What :func:`encode_event` needs of an event (a :class:`~trioflow.FlowEvent` has it)."""

    @property
    def seq(self) -> int:
        """The event's seq: the SSE ``id:``."""

    @property
    def type(self) -> str:
        """The event's type: its SSE ``event:`` name, but for :data:`RENAMED_EVENTS`."""

    def to_json(self) -> str:
        """The event as JSON: the SSE ``data:``."""


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def event_name(type: str) -> str:
    """The SSE ``event:`` name of events of ``type`` (``type`` itself, except :data:`RENAMED_EVENTS`)."""
    return RENAMED_EVENTS.get(type, type)


def encode_event(event: WireEvent) -> str:
    """``event`` as one SSE frame: ``id:`` its seq, ``event:`` its :func:`event_name`, ``data:`` its JSON.

    The same frame as :meth:`FlowEvent.to_sse() <trioflow.FlowEvent.to_sse>`
    except for the :data:`RENAMED_EVENTS`.
    """
    type = event.type
    return event_frame(event.seq, RENAMED_EVENTS.get(type, type), event.to_json())


def encode_error(code: str, message: str, **details: Any) -> str:
    """A :data:`ERROR_EVENT` frame with ``{"code", "message", **details}`` (no ``id:``)."""
    return encode(_dumps({"code": code, "message": message, **details}), event=ERROR_EVENT)


def error_info(error: BaseException | str) -> ErrorInfo:
    """``{"type", "message"}`` of ``error``: its class name and ``str``.

    A plain message (a ``str``) has the type ``"Error"``.
    """
    if isinstance(error, BaseException):
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": "Error", "message": str(error)}
