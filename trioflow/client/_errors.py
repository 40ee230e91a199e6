"""The errors a trioflow server reports to its clients, as exceptions.

A server refuses a request (HTTP ``401``, ``404``, ...) or ends a stream with
an error of its own (an SSE error event, a WebSocket ``error`` frame); the
clients raise these as :class:`StreamError`, or as :class:`ResumeExpired`
when the events to resume from are gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trioflow.history import HistoryExpired
from trioflow.protocol import HISTORY_EXPIRED

__all__ = ["ResumeExpired", "StreamError"]


class StreamError(Exception):
    """The server refused a request or ended a stream with an error.

    Args:
        message: what went wrong, for people.
        code: the server's machine-readable error code (``"unauthorized"``,
            ``"not_found"``, ``"history_expired"``, ...); ``"http_<status>"``
            when the server sent no code of its own.
        status: the HTTP status of the refused request, if any.
        data: everything the server said about the error.

    Attributes:
        code: the error code.
        message: the message.
        status: the HTTP status, or ``None`` (an error inside a stream).
        data: the server's error payload.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        status: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        # Not super(): in ResumeExpired the next class is HistoryExpired, with other arguments.
        Exception.__init__(self, f"{code}: {message}" if code else message)
        self.code = code
        self.message = message
        self.status = status
        self.data: Mapping[str, Any] = dict(data) if data else {}

    @classmethod
    def from_payload(cls, payload: object, *, status: int | None = None) -> StreamError:
        """Build the exception that a server's error payload stands for.

        Args:
            payload: the decoded error: an object with ``code`` and ``message``
                (other fields are kept in :attr:`data`), or anything else,
                which becomes the message.
            status: the HTTP status the payload came with, if any.

        Returns:
            A :class:`ResumeExpired` for the code ``history_expired`` (the
            requested events are gone), else a :class:`StreamError`.
        """
        if isinstance(payload, Mapping):
            # Accept {"code", "message"}, {"error": {"code", "message"}} and
            # {"error": "code", "message": ...}: the shapes HTTP APIs use.
            inner = payload.get("error")
            fields: Mapping[str, Any] = inner if isinstance(inner, Mapping) else payload
            code = fields.get("code")
            if code is None and isinstance(inner, str):
                code = inner
            message = fields.get("message") or fields.get("detail") or payload.get("message")
            data: Mapping[str, Any] = dict(payload)
        else:
            code, message, data = None, payload, {}
        code_text = str(code) if code else (f"http_{status}" if status else "error")
        text = str(message) if message else code_text.replace("_", " ")
        if code_text in _EXPIRED_CODES:
            return ResumeExpired(text, code=code_text, status=status, data=data)
        return cls(text, code=code_text, status=status, data=data)


_EXPIRED_CODES = frozenset({HISTORY_EXPIRED})


class ResumeExpired(StreamError, HistoryExpired):
    """The events to resume from are no longer retained by the server.

    Both a :class:`StreamError` and a :class:`~trioflow.HistoryExpired`, so
    code written against a local bus's replay catches it too. Follow the run
    live by connecting without ``after`` (and accept the gap), or raise the
    server's history size.

    Attributes:
        requested: the seq the client asked to resume after (``-1`` if the
            server did not say).
        first_available: the oldest seq the server still retains (``-1`` if
            it did not say).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "history_expired",
        status: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        StreamError.__init__(self, message, code=code, status=status, data=data)
        self.requested = _int_field(self.data, "requested", "after")
        self.first_available = _int_field(self.data, "first_available", "first_seq")


def _int_field(data: Mapping[str, Any], *names: str) -> int:
    for source in (data, data.get("error")):
        if isinstance(source, Mapping):
            for name in names:
                value = source.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
    return -1
