"""The web server: runs over HTTP, Server-Sent Events and WebSockets, and the browser page.

``trioflow serve`` runs it from the command line; from Python::

    import functools
    import trio
    from trioflow import StreamingFlowExecutor
    from trioflow.web import WebConfig, create_app, serve


    async def main() -> None:
        executor = StreamingFlowExecutor()
        app = create_app(executor, config=WebConfig(port=8080))
        stop = trio.Event()                       # set it to shut down gracefully
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(functools.partial(serve, app, shutdown_trigger=stop.wait))
            print("serving on", urls[0])


    trio.run(main)

The modules, one concept each: :mod:`~trioflow.web._app` (the application
and its HTTP endpoints), :mod:`~trioflow.web._body` (a request's JSON body
read within its limits), :mod:`~trioflow.web._sse` (the event stream, its
framing and its error events), :mod:`~trioflow.web._formats` (which wire
format a request gets: ``?format=``, ``Accept``), :mod:`~trioflow.web._ndjson` and
:mod:`~trioflow.web._agui` (the same events as NDJSON and as AG-UI,
:doc:`/howto/agui`), :mod:`~trioflow.web._vercel` (as the Vercel AI SDK's UI
message stream, with ``useChat``'s chat endpoints), :mod:`~trioflow.web._fanout` (one run's
events encoded once and written to every watching connection),
:mod:`~trioflow.web._streams` (what event streams and WebSockets share: a
run's frames cached, the catch-up, the join to the fan-out),
:mod:`~trioflow.web._direct` (the event stream served on the connection
itself, under :func:`~trioflow.web.serve`), :mod:`~trioflow.web._ws` (the WebSocket
protocol, over Starlette's ``WebSocket`` or the socket itself),
:mod:`~trioflow.web._direct_ws` (WebSockets served on the connection itself: the
handshake and the framing), :mod:`~trioflow.web._auth` (token and ``Origin``),
:mod:`~trioflow.web._hosts` (the ``Host`` allow-list),
:mod:`~trioflow.web._connections` (each connection guarded: write timeout,
forced close, the connection cap),
:mod:`~trioflow.web._errors` (the JSON error shape),
:mod:`~trioflow.web._runs` (requests, watchers, draining),
:mod:`~trioflow.web._server` (Hypercorn and graceful shutdown),
:mod:`~trioflow.web._tls` (HTTPS: the TLS context and each connection's handshake),
:mod:`~trioflow.web._config` (the options) and
:mod:`~trioflow.web._defaults` (the agents and metrics of ``trioflow serve``,
whose command is :mod:`trioflow.cli._serve`).

The names below are imported on first use: ``import trioflow.web._config``
does not load Starlette or Hypercorn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioflow.web._app import create_app
    from trioflow.web._config import TOKEN_ENV, WebConfig
    from trioflow.web._defaults import agent_factory, open_metrics
    from trioflow.web._errors import ApiError
    from trioflow.web._runs import (
        AgentFactory,
        ModelNotAllowed,
        OnDisconnect,
        RunRequest,
        open_request_agent,
        request_agent,
    )
    from trioflow.web._server import serve
    from trioflow.web._sse import ERROR_EVENT, RENAMED_EVENTS

_SOURCES = {
    "ERROR_EVENT": "_sse",
    "RENAMED_EVENTS": "_sse",
    "TOKEN_ENV": "_config",
    "AgentFactory": "_runs",
    "ApiError": "_errors",
    "ModelNotAllowed": "_runs",
    "OnDisconnect": "_runs",
    "RunRequest": "_runs",
    "open_request_agent": "_runs",
    "request_agent": "_runs",
    "WebConfig": "_config",
    "agent_factory": "_defaults",
    "create_app": "_app",
    "open_metrics": "_defaults",
    "serve": "_server",
}

__all__ = [
    "ERROR_EVENT",
    "RENAMED_EVENTS",
    "TOKEN_ENV",
    "AgentFactory",
    "ApiError",
    "ModelNotAllowed",
    "OnDisconnect",
    "RunRequest",
    "WebConfig",
    "agent_factory",
    "create_app",
    "open_metrics",
    "open_request_agent",
    "request_agent",
    "serve",
]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use (PEP 562)."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
