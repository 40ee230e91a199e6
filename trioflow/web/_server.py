"""Serving the application with Hypercorn inside a Trio program: :func:`serve`.

In the shape of :func:`hypercorn.trio.serve`::

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
        )

When ``shutdown_trigger`` returns, the shutdown is graceful and bounded:
new runs are refused (``503``), every running run is cancelled (each emits
``flow.cancelled``), open event streams and WebSockets deliver that terminal
event and end, the listening sockets close and idle connections are closed.
:attr:`~trioflow.web.WebConfig.shutdown_timeout` seconds after the trigger,
every connection still open is closed by force, whatever it is doing (a
client that stopped reading cannot hold the process). Cancelling
:func:`serve` instead closes every connection at once (runs still end with
``flow.cancelled``, but streams may not deliver it).

Every connection is guarded (:mod:`trioflow.web._connections`): a write that
makes no progress for :attr:`~trioflow.web.WebConfig.write_timeout` closes
it; a request head must arrive within
:attr:`~trioflow.web.WebConfig.header_timeout`; beyond
:attr:`~trioflow.web.WebConfig.max_connections` new connections are answered
``503`` by the server itself (``GET /healthz`` gets its usual answer) and
closed; and running out of file descriptors is logged once, not spun on.

Why not ``hypercorn.trio.serve``
    Hypercorn's own entry point owns its accept loop and hands each
    connection straight to its HTTP machinery. trioflow needs the
    connection first: to guard it (the write timeout and the forced close
    above, which Hypercorn has no equivalent for: it writes under a shielded
    scope with no timeout, so one stalled peer could hold a shutdown
    forever), to answer beyond the cap without parsing HTTP in Hypercorn, to
    keep accepting through ``EMFILE`` without a traceback per attempt, and
    to serve event streams itself. So this module is Hypercorn's Trio worker
    loop (the lifespan, the listeners, one connection server per
    connection), built from the Hypercorn pieces that loop uses; a test
    (``tests/test_web_server.py``) pins exactly those names, so an upgrade
    that moves one fails in CI.

One owner per connection
    Each accepted connection belongs to its task from accept to close. The
    task reads the first bytes, and when they may begin an event stream
    (``GET /runs/``, ``GET /ws``), the head of the first request (within
    :attr:`~trioflow.web.WebConfig.header_timeout`). An event stream
    (``GET /runs/{id}/events`` over cleartext HTTP/1.1, for an application
    without middleware of its own) is served by trioflow on the spot, the
    connection closed after it (:mod:`trioflow.web._direct`): no HTTP
    machinery, no ASGI, one descriptor; so is a WebSocket handshake for
    ``/runs/{id}/ws`` or ``/ws`` (:mod:`trioflow.web._direct_ws`). Every other connection is handed,
    with the bytes read pushed back in front, to Hypercorn's connection
    server (``hypercorn.trio.tcp_server.TCPServer``), which parses every
    request on it, runs the application and writes every response; the
    event stream is then an ordinary ASGI response.

TLS
    With :attr:`~trioflow.web.WebConfig.certfile` and
    :attr:`~trioflow.web.WebConfig.keyfile` the server speaks HTTPS only:
    each guarded connection goes through its TLS handshake
    (:mod:`trioflow.web._tls`) and then straight to Hypercorn, HTTP/2 or
    HTTP/1.1 as the client chose by ALPN; event streams are then ordinary
    ASGI responses (every byte goes through the TLS layer). The guards, the
    cap and the shutdown apply to TLS connections alike; over the cap, a TLS
    connection is closed (its ``ClientHello`` is not a request the ``503``
    could answer).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app
from starlette.applications import Starlette

from trioflow.executor import StreamingFlowExecutor
from trioflow.web._app import access_policy, create_app, direct_writes, hub_of
from trioflow.web._auth import AccessPolicy
from trioflow.web._config import WebConfig, default_max_connections
from trioflow.web._connections import Connections, GuardedStream
from trioflow.web._direct import read_request, serve_event_stream, stream_target
from trioflow.web._direct_ws import serve_socket, socket_target
from trioflow.web._runs import RunHub
from trioflow.web._tls import TLS, server_context

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
    hconfig.keep_alive_timeout = config.header_timeout
    hconfig.backlog = 2048  # a burst of a thousand clients connecting at once (Hypercorn: 100)
    # Above max_body, so that the application sees a message somewhat too
    # large and answers it with a message_too_large frame (the connection
    # stays open); beyond the ceiling Hypercorn closes with 1009.
    hconfig.websocket_max_message_size = config.websocket_message_ceiling
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
    """Serve ``app`` over HTTP or HTTPS until ``shutdown_trigger`` returns (or until cancelled).

    Start it with ``await nursery.start(...)``: it reports the URLs it is
    listening on (``["http://127.0.0.1:8080"]``, ``https://`` with
    :attr:`~trioflow.web.WebConfig.certfile` and
    :attr:`~trioflow.web.WebConfig.keyfile`) once the socket is bound,
    which is how to learn the port picked for ``port=0``. Over HTTPS,
    clients that offer HTTP/2 by ALPN get it (browsers do: no limit of six
    event streams per origin), the others HTTP/1.1.

    Every connection is bounded: a write that makes no progress for
    :attr:`~trioflow.web.WebConfig.write_timeout` closes it, and beyond
    :attr:`~trioflow.web.WebConfig.max_connections` new connections are
    answered ``503`` (``GET /healthz`` still gets its answer) and closed.
    When accepting fails for want of file descriptors, the server logs it
    once and retries every 0.1 s until it can accept again.

    The shutdown is bounded too: from the moment ``shutdown_trigger``
    returns, it takes at most :attr:`~trioflow.web.WebConfig.shutdown_timeout`
    (see the module documentation), after which every connection still open
    is closed by force. Cancelling :func:`serve` closes every connection at
    once and returns promptly.

    Args:
        app: an application made by :func:`~trioflow.web.create_app`, or an
            executor to make one for (with ``config`` and the default agent).
        config: where to listen, the TLS certificate and key if any, the
            connection limits and how long a graceful shutdown may take;
            ``None`` for the options ``app`` was made with. The
            application's own behaviour (token, limits) is the one it was
            made with.
        shutdown_trigger: an async callable (``event.wait``); when it
            returns, the server shuts down gracefully (see the module
            documentation). ``None``: serve until cancelled.
        task_status: for :meth:`trio.Nursery.start`.

    Raises:
        TypeError: ``app`` was not made by :func:`~trioflow.web.create_app`.
        OSError: the address cannot be bound (in use, not permitted).
        ValueError: the certificate or key of ``config`` cannot be used
            (any more: they are checked when the configuration is made).
    """
    if isinstance(app, StreamingFlowExecutor):
        app = create_app(app, config=config)
    hub = hub_of(app)
    config = config or hub.config
    hconfig = hypercorn_config(config)
    shutdown = _Shutdown()
    connections = Connections(
        max_connections=config.max_connections or default_max_connections(),
        write_timeout=config.write_timeout,
    )
    tls = None
    if config.certfile is not None and config.keyfile is not None:
        context = server_context(config.certfile, config.keyfile)
        tls = TLS(context, handshake_timeout=config.header_timeout)

    with _unwrap_single():
        async with trio.open_nursery() as nursery:

            async def drain(trigger: Callable[[], Awaitable[Any]]) -> None:
                await trigger()
                shutdown.deadline = trio.current_time() + config.shutdown_timeout
                _log.info("shutting down: cancelling runs, letting streams finish")
                await hub.drain(config.shutdown_timeout)
                shutdown.event.set()

            async def run_server(*, task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await _worker(
                        app,
                        hconfig,
                        hub=hub,
                        connections=connections,
                        header_timeout=config.header_timeout,
                        direct=access_policy(app) if direct_writes(app) else None,
                        tls=tls,
                        shutdown=shutdown,
                        task_status=task_status,
                    )
                finally:
                    nursery.cancel_scope.cancel()

            if shutdown_trigger is not None:
                nursery.start_soon(drain, shutdown_trigger)
            urls: list[str] = await nursery.start(run_server)
            task_status.started(urls)


class _Connection(TCPServer):
    """Hypercorn's connection server, closing as soon as its peer has.

    Hypercorn 0.18's ``TCPServer`` keeps a keep-alive connection that its
    peer closed while idle open until the keep-alive timeout (its idle task
    outlives the reading), holding a descriptor and a place under
    :attr:`~trioflow.web.WebConfig.max_connections` for nothing. Here the
    idle task stops when the reading does. (Internal names of Hypercorn:
    ``_read_data`` and ``idle_task``, pinned by ``tests/test_web_server.py``.)
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()  # the peer is gone: no request to wait for


@dataclasses.dataclass(slots=True)
class _Shutdown:
    """When the graceful shutdown began to end, and by when it must be over."""

    event: trio.Event = dataclasses.field(default_factory=trio.Event)
    deadline: float = math.inf


_ACCEPT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS},
)
"""Accept errors that mean "out of resources for now": wait and try again."""

_ACCEPT_RETRY = 0.1
"""Seconds between two attempts to accept while out of file descriptors."""


async def _accept_loop(
    listener: trio.SocketListener,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept connections from ``listener`` and start ``handle`` for each in ``nursery``.

    Runs until cancelled. Out of file descriptors (``EMFILE``), it logs one
    warning, waits and tries again, without a traceback and without
    spinning; it logs again once it accepts again. Other errors propagate.
    """
    starved = False
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_ERRNOS:
                raise
            if not starved:
                _log.warning(
                    "cannot accept connections: %s; trying again every %g s",
                    os.strerror(exc.errno or 0),
                    _ACCEPT_RETRY,
                )
                starved = True
            await trio.sleep(_ACCEPT_RETRY)
            continue
        if starved:
            _log.warning("accepting connections again")
            starved = False
        nursery.start_soon(handle, stream)


_REFUSE_TIMEOUT = 2.0
"""Seconds a connection over the cap has to send its request head."""


async def _refuse(stream: trio.SocketStream, hub: RunHub, connections: Connections) -> None:
    """Answer a connection over the cap: ``503``, or the health status for ``GET /healthz``.

    The request head is read (for at most a couple of seconds, 16 KiB) so
    that a health check learns the server is alive; every other request is
    told to come back later (``Retry-After``). Then the connection is closed.
    """
    connections.refusing()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    request: h11.Request | None = None
    async with stream:
        with trio.move_on_after(_REFUSE_TIMEOUT):
            try:
                while request is None:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(16 * 1024)
                        conn.receive_data(data)
                        if not data:
                            return
                    elif isinstance(event, h11.Request):
                        request = event
                    else:
                        return
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
        body: dict[str, Any]
        if request is not None and request.method == b"GET" and request.target == b"/healthz":
            status, body = (
                (503, {"status": "shutting_down"}) if hub.closing else (200, {"status": "ok"})
            )
        else:
            status, body = (
                503,
                {
                    "error": {
                        "code": "too_many_connections",
                        "message": f"the server holds its limit of {connections.max_connections} "
                        "connections; try again shortly",
                    }
                },
            )
        payload = json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Service Unavailable'}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
            "retry-after: 1\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n"
        ).encode("ascii")
        with trio.move_on_after(_REFUSE_TIMEOUT):
            try:
                await stream.send_all(head + payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def _worker(
    app: Starlette,
    config: HypercornConfig,
    *,
    hub: RunHub,
    connections: Connections,
    header_timeout: float,
    direct: AccessPolicy | None,
    tls: TLS | None,
    shutdown: _Shutdown,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """``hypercorn.trio.serve`` for plain TCP, with trioflow's connection guards.

    The same steps as Hypercorn's Trio worker (the lifespan, the listeners,
    one ``TCPServer`` per connection), except that every connection is a
    :class:`~trioflow.web._connections.GuardedStream` registered in
    ``connections``; that event streams are served on the connection itself
    (:mod:`trioflow.web._direct`) unless ``direct`` (the application's
    access rules) is ``None`` or the connection is TLS (``tls``: taken
    through its handshake, then to Hypercorn); and that the shutdown ends
    at ``shutdown.deadline`` by closing what is still open.
    """
    wrapped = wrap_app(cast("Any", app), config.wsgi_max_body_size, "asgi")
    state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, state)
    context = WorkerContext(None)
    reading: set[trio.CancelScope] = set()  # connections reading their first head
    head_limit = config.h11_max_incomplete_size

    async def fast_path(guarded: GuardedStream) -> bool:
        """Serve the connection here if it is an event stream; False: it is Hypercorn's."""
        assert direct is not None
        # One scope for both ends of the wait: the header timeout, and the
        # shutdown (which cancels every connection still reading its head).
        with trio.CancelScope(deadline=trio.current_time() + header_timeout) as scope:
            reading.add(scope)
            try:
                read = await read_request(guarded, limit=head_limit)
            finally:
                reading.discard(scope)
        if scope.cancelled_caught or read is None:
            return True  # no request in time, shutting down, or the peer left: closed
        request, data = read
        if request is not None and (socket := socket_target(request)) is not None:
            await serve_socket(
                guarded, request, socket, data, hub=hub, access=direct, hconfig=config
            )
            return True
        target = None if request is None else stream_target(request)
        if request is None or target is None:
            guarded.unread(data)
            return False
        try:
            await serve_event_stream(
                guarded, request, target, hub=hub, access=direct, hconfig=config
            )
        except Exception:
            _log.exception("error serving GET %s", request.target.decode("ascii", "replace"))
        return True

    async def tls_connection(stream: trio.SSLStream[GuardedStream]) -> None:
        await _Connection(wrapped, config, context, ConnectionState(state.copy()), stream)  # type: ignore[arg-type]

    async def connection(stream: trio.SocketStream) -> None:
        if connections.full():
            await _refuse(stream, hub, connections)
            return
        guarded = connections.guard(stream)
        try:
            if tls is not None:  # HTTPS: straight to Hypercorn, HTTP/2 or 1.1 by ALPN (_tls)
                await tls.serve_connection(guarded, tls_connection)
                return
            # The fast path is for cleartext HTTP/1.1 only (a TLS stream goes to Hypercorn).
            if direct is not None and await fast_path(guarded):
                try:
                    await guarded.send_eof()  # a shutdown(2): never blocks
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                await guarded.aclose()
                return
            await _Connection(wrapped, config, context, ConnectionState(state.copy()), guarded)  # type: ignore[arg-type]
        finally:
            guarded.abort()  # closed already, unless the connection's task was cancelled

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        sockets = config.create_sockets().insecure_sockets
        listeners: list[trio.SocketListener] = []
        urls = []
        try:
            for sock in sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                scheme = "http" if tls is None else "https"
                urls.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
            async with trio.open_nursery() as handlers:
                try:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(_accept_loop, listener, connection, handlers)
                        task_status.started(urls)
                        await shutdown.event.wait()
                        accepting.cancel_scope.cancel()
                    for sock in sockets:
                        sock.close()  # refuse new connections from now on
                    await context.terminated.set()  # idle keep-alive connections close
                    for scope in list(reading):  # and so do connections with no request yet
                        scope.cancel()
                    with trio.move_on_at(shutdown.deadline):
                        await connections.wait_empty()
                finally:
                    forced = connections.close_all()
                    if forced:
                        _log.info("shutdown: closed %d connection(s) still open", forced)
                    handlers.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
        with trio.move_on_after(_LIFESPAN_GRACE):
            await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


_LIFESPAN_GRACE = 1.0
"""Seconds the application's lifespan may take to shut down (its runs end) once
the connections are closed; then it is cancelled."""
