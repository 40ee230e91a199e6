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
:mod:`~trioflow.web.command` (``trioflow serve``).
"""

from trioflow.web.app import create_app, hub_of
from trioflow.web.config import TOKEN_ENV, WebConfig
from trioflow.web.errors import ApiError
from trioflow.web.runs import AgentFactory, OnDisconnect, RunHub, RunRequest
from trioflow.web.server import serve
from trioflow.web.sse import ERROR_EVENT, RENAMED_EVENTS

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
    "create_app",
    "hub_of",
    "serve",
]
