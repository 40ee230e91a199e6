r"""The Server-Sent Events codec: :func:`encode` a frame, :class:`SSEDecoder` a stream.

One implementation of the ``text/event-stream`` format (as the HTML Living
Standard defines it) for every part of trioflow that speaks it: the server's
event stream (:mod:`trioflow.web._sse`), its client
(:mod:`trioflow.client`), the Claude model reading the Messages API's stream
(:mod:`trioflow.models._claude`) and the Anthropic test server
(:mod:`trioflow.testing._anthropic_server`). It needs nothing beyond the
standard library.

Encoding::

    >>> encode('{"n":1}', event="tick", id=7)
    'id: 7\nevent: tick\ndata: {"n":1}\n\n'
    >>> encode("two\nlines")
    'data: two\ndata: lines\n\n'
    >>> encode(comment="keepalive") + encode(retry=3000)
    ': keepalive\n\nretry: 3000\n\n'

Decoding is incremental: feed the body's bytes in chunks of any size and get
the events they complete::

    decoder = SSEDecoder()
    for chunk in body:
        for event in decoder.feed(chunk):
            print(event.event, event.id, event.data)

:class:`SSELineDecoder` is the layer underneath, bytes in and lines out, for a
reader that wants every field and comment (:func:`parse_line` splits a line).
"""

from __future__ import annotations

import dataclasses
from typing import Final, Literal

__all__ = [
    "BOM",
    "SSEDecoder",
    "SSELineDecoder",
    "ServerSentEvent",
    "encode",
    "event_frame",
    "parse_line",
]

BOM: Final = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark a stream may start with (decoders skip it)."""


# -- encoding -------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """``text`` split at each CRLF, LF or CR, the line breaks of the format."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def encode(
    data: str | None = None,
    *,
    event: str | None = None,
    id: str | int | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> str:
    r"""One frame of an event stream, ending in the blank line that dispatches it.

    The fields go out in the order ``:`` (comment), ``retry:``, ``id:``,
    ``event:``, ``data:``, each followed by one space; the ones left
    ``None`` are omitted. ``data`` is sent as one ``data:`` line per line
    (split at CRLF, LF and CR), which a decoder joins with ``"\n"``: text
    whose line breaks are all ``"\n"`` comes back unchanged. A comment may
    have several lines too. A frame without ``data`` dispatches no event
    (``retry:`` alone, a keep-alive comment, an ``id:`` update).

    Args:
        data: the event's data (``""`` is an event with empty data).
        event: the event's name (decoders say ``"message"`` when there is none).
        id: the event ID, which the client sends back as ``Last-Event-ID``.
        retry: the client's reconnection delay, in milliseconds.
        comment: a comment (decoders ignore it; it keeps a connection busy).

    Returns:
        The frame, as text (ASCII when every value is).

    Raises:
        ValueError: ``event`` or ``id`` has a line break, ``id`` a NUL (a
            decoder would ignore it), or ``retry`` is negative.
    """
    text = "" if comment is None and retry is None else _head(comment, retry)
    if id is not None:
        if id.__class__ is not int:
            id = _id_value(id)
        text = f"{text}id: {id}\n"
    if event is not None:
        if "\n" in event or "\r" in event:
            raise ValueError(f"an SSE 'event' field cannot contain a line break: {event!r}")
        text = f"{text}event: {event}\n"
    if data is None:
        return f"{text}\n"
    if "\n" in data or "\r" in data:
        return text + "".join([f"data: {line}\n" for line in _lines(data)]) + "\n"
    return f"{text}data: {data}\n\n"


def event_frame(id: int, event: str, data: str) -> str:
    """``encode(data, event=event, id=id)`` with no checks, for values known to be one line.

    The frame of every :class:`~trioflow.FlowEvent` (a validated event type,
    compact JSON with every line break escaped), made once per event on the
    server's path: one f-string. A line break in ``event`` or ``data`` would
    break the stream; use :func:`encode` for anything else.
    """
    return f"id: {id}\nevent: {event}\ndata: {data}\n\n"


def _head(comment: str | None, retry: int | None) -> str:
    parts: list[str] = []
    if comment is not None:
        parts.extend([f": {line}\n" if line else ":\n" for line in _lines(comment)])
    if retry is not None:
        if retry < 0:
            raise ValueError(f"an SSE 'retry' field must be >= 0, not {retry}")
        parts.append(f"retry: {int(retry)}\n")
    return "".join(parts)


def _id_value(id: str | int) -> str:
    text = str(id)
    if "\n" in text or "\r" in text:
        raise ValueError(f"an SSE 'id' field cannot contain a line break: {text!r}")
    if "\0" in text:
        raise ValueError(f"an SSE 'id' field cannot contain NUL: {text!r}")
    return text


# -- decoding -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched Server-Sent Event."""

    event: str = "message"
    """The ``event:`` field; ``"message"`` when the frame had none."""
    data: str = ""
    """The ``data:`` lines, joined with ``"\\n"``."""
    id: str = ""
    """The stream's last event ID when the event was dispatched (it carries over)."""


Errors = Literal["strict", "replace"]
"""What a decoder does with a line that is not UTF-8: raise, or replace the bad bytes."""


class SSELineDecoder:
    """The lines of a ``text/event-stream`` body, from its bytes in chunks of any size.

    Lines end with CRLF, LF or CR (a CR at the end of a chunk waits for the
    next one, which may start with the LF of a CRLF). A byte order mark at
    the start of the stream is skipped. Lines are decoded from UTF-8 whole,
    so a character split between chunks is fine.

    Args:
        errors: ``"replace"`` (the format's rule) replaces bytes that are not
            UTF-8; ``"strict"`` raises :exc:`UnicodeDecodeError` for the line.
    """

    __slots__ = ("_errors", "_partial", "_started")

    def __init__(self, *, errors: Errors = "replace") -> None:
        self._partial = b""
        self._started = False
        self._errors = errors

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished line are held back."""
        return bool(self._partial)

    def feed(self, chunk: bytes) -> list[str]:
        """Decode ``chunk``, the next bytes of the body.

        Returns:
            The lines it completed, without their line breaks.

        Raises:
            UnicodeDecodeError: with ``errors="strict"``, a line that is not UTF-8.
        """
        text = self._partial + chunk if self._partial else chunk
        if not self._started:
            if len(text) < 3 and BOM.startswith(text):
                self._partial = text  # perhaps the start of a byte order mark
                return []
            self._started = True
            if text.startswith(BOM):
                text = text[3:]
        if b"\r" in text:
            # Hold back a final CR: it may be the first half of a CRLF.
            hold = text.endswith(b"\r")
            if hold:
                text = text[:-1]
            raw = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            self._partial = raw.pop() + (b"\r" if hold else b"")
        else:
            raw = text.split(b"\n")
            self._partial = raw.pop()
        errors = self._errors
        return [line.decode("utf-8", errors) for line in raw]

    def close(self) -> list[str]:
        """End of the body: the last line, if a CR ended it; an unfinished line is dropped.

        Returns:
            The line the held-back CR ended (``[]`` or one line).

        Raises:
            UnicodeDecodeError: with ``errors="strict"``, that line is not UTF-8.
        """
        partial, self._partial = self._partial, b""
        if partial.endswith(b"\r"):
            return [partial[:-1].decode("utf-8", self._errors)]
        return []


def parse_line(line: str) -> tuple[str, str]:
    """The field name and value of one line: ``("", text)`` for a comment.

    The name is what comes before the first ``:`` (the whole line when there
    is none, with an empty value); one space after the colon is dropped.
    """
    name, _, value = line.partition(":")
    if value.startswith(" "):
        value = value[1:]
    return name, value


class SSEDecoder:
    """An incremental decoder of a ``text/event-stream`` body, as the HTML spec describes it.

    Feed it the body's bytes in chunks of any size; it returns the events
    completed so far. Lines are those of :class:`SSELineDecoder` (CRLF, LF or
    CR; a leading byte order mark skipped); ``:`` lines are comments; an
    event is dispatched at a blank line if it has data. ``id:`` (without NUL)
    sets :attr:`last_event_id`, ``retry:`` (digits only) sets :attr:`retry`,
    unknown fields are ignored. At the end of the body (:meth:`close`) an
    event without its blank line is discarded.

    Args:
        errors: ``"replace"`` (the format's rule) or ``"strict"``: see
            :class:`SSELineDecoder`.

    Attributes:
        last_event_id: the last ``id:`` seen (``""`` before any).
        retry: the last ``retry:`` value in milliseconds, or ``None``.
    """

    __slots__ = ("_data", "_event", "_lines", "last_event_id", "retry")

    def __init__(self, *, errors: Errors = "replace") -> None:
        self._lines = SSELineDecoder(errors=errors)
        self._event = ""
        self._data: list[str] = []
        self.last_event_id = ""
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode ``chunk``, the next bytes of the body.

        Returns:
            The events the chunk completed, in order (often none or one).

        Raises:
            UnicodeDecodeError: with ``errors="strict"``, a line that is not
                UTF-8 (the chunk's events are lost with it: the stream is broken).
        """
        return self._interpret(self._lines.feed(chunk))

    def close(self) -> list[ServerSentEvent]:
        """End of the body: a last event ended by a final CR, if any; an unterminated one is discarded.

        Returns:
            The events the end of the body completed (usually none).

        Raises:
            UnicodeDecodeError: with ``errors="strict"``, the last line is not UTF-8.
        """
        try:
            return self._interpret(self._lines.close())
        finally:
            self._event = ""
            self._data = []

    def _interpret(self, lines: list[str]) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                data, event = self._data, self._event
                if data:
                    self._data = []
                    events.append(
                        ServerSentEvent(event or "message", "\n".join(data), self.last_event_id)
                    )
                self._event = ""
                continue
            if line[0] == ":":  # a comment (the keep-alive pings)
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                if "\0" not in value:
                    self.last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry = int(value)
        return events
