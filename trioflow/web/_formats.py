"""Which wire format a request for a run's events gets: :func:`choose_format`.

One event model, several wire formats of ``GET /runs/{id}/events``:

=============  ============================================  =====================================
format         what                                          also at
=============  ============================================  =====================================
``sse``        trioflow's Server-Sent Events (the default)
``ndjson``     one JSON event per line (:mod:`~trioflow.web._ndjson`)  ``/events.ndjson``
``agui``       AG-UI events over SSE (:mod:`~trioflow.web._agui`)      ``/events.agui``
``vercel``     the Vercel AI SDK UI message stream                     ``/events.vercel``
               (:mod:`~trioflow.web._vercel`)
=============  ============================================  =====================================

The format is chosen by the query's ``format`` parameter
(``?format=ndjson``), else by the ``Accept`` header where the format has a
media type of its own: ``application/x-ndjson`` preferred over
``text/event-stream`` (by its ``q``) is NDJSON; everything else (no
``Accept``, ``*/*``, ``text/event-stream``) is trioflow's SSE. AG-UI and
the UI message stream are both ``text/event-stream``: they are chosen by
path or query only. Resume works alike in every format (``Last-Event-ID``
or ``?after=``).
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import QueryParams

from trioflow.web._errors import ApiError

__all__ = ["FORMATS", "choose_format"]

FORMATS = ("sse", "ndjson", "agui", "vercel")
"""The formats of a run's events, by the name ``?format=`` takes."""

_MEDIA = {"text/event-stream": "sse", "application/x-ndjson": "ndjson"}


def _accepted(header: str) -> str | None:
    """The format ``Accept: header`` prefers, or ``None`` (no preference between the two)."""
    best: tuple[float, int, str] | None = None
    for position, item in enumerate(header.split(",")):
        media, *params = (part.strip() for part in item.split(";"))
        fmt = _MEDIA.get(media.lower())
        if fmt is None:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0 and (best is None or q > best[0]):
            best = (q, -position, fmt)
    return None if best is None else best[2]


def choose_format(query: bytes | str, headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The format of a ``GET /runs/{id}/events`` request: one of :data:`FORMATS`.

    Raises:
        ApiError: ``400`` ``invalid_format``: ``?format=`` names no format.
    """
    if query:
        asked = QueryParams(query).get("format")
        if asked is not None:
            if asked not in FORMATS:
                raise ApiError(
                    400,
                    "invalid_format",
                    f"unknown format {asked!r}; use one of {', '.join(FORMATS)}",
                    allowed=list(FORMATS),
                )
            return asked
    for name, value in headers:
        if name == b"accept":
            if b"ndjson" not in value.lower():  # the one format an Accept can choose
                return "sse"
            return _accepted(value.decode("latin-1")) or "sse"
    return "sse"
