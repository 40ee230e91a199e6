"""Serving the application with Hypercorn inside a Trio program: :func:`serve`.

In the shape of :func:`hypercorn.trio.serve`::

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
        )

When ``shutdown_trigger`` returns, the shutdown is graceful: new runs are
refused (``503``), every running run is cancelled (each emits
``flow.cancelled``), open event streams and WebSockets deliver that terminal
event and end, and only then does Hypercorn stop; all within
:attr:`~trioflow.web.WebConfig.shutdown_timeout` (connections still open then
are closed regardless). Cancelling :func:`serve` instead stops at once (runs
still end with ``flow.cancelled``, but streams may not deliver it).

The server is Hypercorn's Trio worker, with one difference: trioflow accepts
the connections itself and hands each to Hypercorn's connection server
(``hypercorn.trio.tcp_server.TCPServer``, as ``hypercorn.trio.serve`` does),
after making the connection's socket known to the application
(:data:`~trioflow.web.fanout.connection_socket`). Hypercorn parses every
request and writes every response head; the event stream writes its chunks
to the socket itself (:mod:`trioflow.web.fanout`), which is what lets one
process serve a thousand event-stream clients.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app
from starlette.applications import Starlette

from trioflow.executor import StreamingFlowExecutor
from trioflow.web.app import create_app, direct_writes, hub_of
from trioflow.web.config import WebConfig
from trioflow.web.fanout import connection_socket

__all__ = ["hypercorn_config", "serve"]

_log = logging.getLogger("trioflow.web")


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested single-exception groups, else None."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@contextmanager
def _unwrap_single() -> Iterator[None]:
    # Hypercorn nests nurseries: a bind error arrives wrapped in several groups.
    try:
        yield
    except BaseExceptionGroup as group:
        exc = _single(group)
        if exc is None:
            raise
        raise exc from exc.__cause__


def hypercorn_config(config: WebConfig) -> HypercornConfig:
    """The Hypercorn configuration for ``config``: bind address, limits, timeouts, logs."""
    hconfig = HypercornConfig()
    host = config.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    hconfig.bind = [f"{host}:{config.port}"]
    hconfig.graceful_timeout = config.shutdown_timeout
    hconfig.websocket_max_message_size = config.max_body
    # No websocket_ping_interval: Hypercorn 0.18's ping task outlives a closed
    # WebSocket and holds a graceful shutdown for its whole graceful_timeout.
    hconfig.errorlog = _log
    hconfig.accesslog = logging.getLogger("trioflow.web.access") if config.access_log else None
    return hconfig


async def serve(
    app: Starlette | StreamingFlowExecutor,
    config: WebConfig | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP until ``shutdown_trigger`` returns (or until cancelled).

    Start it with ``await nursery.start(...)``: it reports the URLs it is
    listening on (``["http://127.0.0.1:8080"]``) once the socket is bound,
    which is how to learn the port picked for ``port=0``.

    Args:
        app: an application made by :func:`~trioflow.web.create_app`, or an
            executor to make one for (with ``config`` and the default agent).
        config: where to listen and how long a graceful shutdown may take;
            ``None`` for the options ``app`` was made with. The application's
            own behaviour (token, limits) is the one it was made with.
        shutdown_trigger: an async callable (``event.wait``); when it
            returns, the server shuts down gracefully (see the module
            documentation). ``None``: serve until cancelled.
        task_status: for :meth:`trio.Nursery.start`.

    Raises:
        TypeError: ``app`` was not made by :func:`~trioflow.web.create_app`.
        OSError: the address cannot be bound (in use, not permitted).
    """
    if isinstance(app, StreamingFlowExecutor):
        app = create_app(app, config=config)
    hub = hub_of(app)
    config = config or hub.config
    hconfig = hypercorn_config(config)
    stop = trio.Event()

    with _unwrap_single():
        async with trio.open_nursery() as nursery:

            async def drain(trigger: Callable[[], Awaitable[Any]]) -> None:
                await trigger()
                _log.info("shutting down: cancelling runs, letting streams finish")
                await hub.drain(config.shutdown_timeout)
                stop.set()

            async def run_server(*, task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await _worker(
                        app,
                        hconfig,
                        direct=direct_writes(app),
                        shutdown_trigger=stop.wait,
                        task_status=task_status,
                    )
                finally:
                    nursery.cancel_scope.cancel()

            if shutdown_trigger is not None:
                nursery.start_soon(drain, shutdown_trigger)
            urls: list[str] = await nursery.start(run_server)
            task_status.started(urls)


async def _worker(
    app: Starlette,
    config: HypercornConfig,
    *,
    direct: bool,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """``hypercorn.trio.serve`` for plain TCP, setting :data:`connection_socket` per connection.

    With ``direct`` false, the socket is not made known: every event stream
    goes through the ASGI ``send``.

    The same steps as Hypercorn's Trio worker: the lifespan, the listeners,
    one ``TCPServer`` per connection, and on shutdown the grace period.
    """
    wrapped = wrap_app(cast("Any", app), config.wsgi_max_body_size, "asgi")
    state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, state)
    context = WorkerContext(None)

    async def connection(stream: trio.SocketStream) -> None:
        if direct:
            connection_socket.set(stream)  # this task's context, inherited by the app's tasks
        await TCPServer(wrapped, config, context, ConnectionState(state.copy()), stream)  # type: ignore[arg-type]

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            urls = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(urls)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(
                        functools.partial(
                            trio.serve_listeners,
                            connection,
                            listeners,
                            handler_nursery=server_nursery,
                        )
                    )
            except BaseExceptionGroup as group:
                _, others = group.split(ShutdownError)
                if others is not None:
                    raise others from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
