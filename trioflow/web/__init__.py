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

The modules, one concept each: :mod:`~trioflow.web.app` (the application
and its HTTP endpoints), :mod:`~trioflow.web.sse` (the event stream, its
framing and its error events), :mod:`~trioflow.web.fanout` (one run's
events encoded once and written to every watching connection), :mod:`~trioflow.web.ws` (the WebSocket
protocol), :mod:`~trioflow.web.auth` (token and ``Origin``),
:mod:`~trioflow.web.errors` (the JSON error shape),
:mod:`~trioflow.web.runs` (requests, watchers, draining),
:mod:`~trioflow.web.server` (Hypercorn and graceful shutdown),
:mod:`~trioflow.web.config` (the options) and
:mod:`~trioflow.web.defaults` (the agents and metrics of ``trioflow serve``,
whose command is :mod:`trioflow.cli.serve`).

The names below are imported on first use: ``import trioflow.web.config``
does not load Starlette or Hypercorn.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioflow.web.app import create_app, hub_of
    from trioflow.web.config import TOKEN_ENV, WebConfig
    from trioflow.web.defaults import agent_factory, open_metrics
    from trioflow.web.errors import ApiError
    from trioflow.web.runs import AgentFactory, OnDisconnect, RunHub, RunRequest
    from trioflow.web.server import serve
    from trioflow.web.sse import ERROR_EVENT, RENAMED_EVENTS

_SOURCES = {
    "ERROR_EVENT": "sse",
    "RENAMED_EVENTS": "sse",
    "TOKEN_ENV": "config",
    "AgentFactory": "runs",
    "ApiError": "errors",
    "OnDisconnect": "runs",
    "RunHub": "runs",
    "RunRequest": "runs",
    "WebConfig": "config",
    "agent_factory": "defaults",
    "create_app": "app",
    "hub_of": "app",
    "open_metrics": "defaults",
    "serve": "server",
}

__all__ = [
    "ERROR_EVENT",
    "RENAMED_EVENTS",
    "TOKEN_ENV",
    "AgentFactory",
    "ApiError",
    "OnDisconnect",
    "RunHub",
    "RunRequest",
    "WebConfig",
    "agent_factory",
    "create_app",
    "hub_of",
    "open_metrics",
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
