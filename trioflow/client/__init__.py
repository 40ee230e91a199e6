"""Trio clients of a trioflow server: follow runs over Server-Sent Events or WebSockets.

* :func:`sse_events` follows one run's event stream (``GET /runs/{id}/events``)
  with :mod:`httpx`, reconnecting with ``Last-Event-ID`` when the connection
  drops: every event once, in order, up to the terminal event.
* :func:`ws_connect` opens a :class:`WsConnection` (on ``trio-websocket``) to
  ``/ws``, to start runs and follow them, or to a run's ``/runs/{id}/ws``.
* :class:`StreamError` (and :class:`ResumeExpired`) are the errors the server
  reports; :class:`ConnectionClosed` (trio-websocket's) carries a WebSocket's
  close code and reason.

``trioflow watch URL`` (:mod:`trioflow.cli._watch`) shows a run's events
in the terminal the way ``trioflow run`` does.
"""

from trioflow.client._errors import ResumeExpired, StreamError
from trioflow.client._sse import ServerSentEvent, SSEDecoder, SSEEventStream, sse_events
from trioflow.client._ws import ConnectionClosed, WsConnection, ws_connect

__all__ = [
    "ConnectionClosed",
    "ResumeExpired",
    "SSEDecoder",
    "SSEEventStream",
    "ServerSentEvent",
    "StreamError",
    "WsConnection",
    "sse_events",
    "ws_connect",
]
