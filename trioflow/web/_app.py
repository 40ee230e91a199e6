"""The ASGI application: :func:`create_app` and its HTTP endpoints.

==========================  ===============================================================
``GET /``                   the browser page (``static/index.html``); ``/static/...``: its files
``GET /healthz``            ``{"status": "ok"}`` (``503`` ``shutting_down`` while draining)
``POST /runs``              start a run: ``{"task", "timeout"?, "max_iterations"?,
                            "on_disconnect"?}`` → ``201`` ``{"run_id", "status",
                            "url", "events_url", "ws_url"}``
``GET /runs``               every retained run (``?status=running,completed`` to filter)
``GET /runs/{id}``          one run: status, progress, counts, output, result
``POST /runs/{id}/cancel``  ``202``; the run ends with ``flow.cancelled`` (``409`` if finished);
                            ``{"mode": "after_turn"}`` lets the current turn finish first
``POST /threads``           a new conversation: ``{"metadata"?}`` → ``201`` ``{"thread_id", "url"}``
``GET /threads``            the retained conversations (:mod:`trioflow.threads`)
``GET /threads/{id}``       one conversation: messages, runs, the run going
``POST /threads/{id}/runs`` its next run: ``{"message", "timeout"?, ...}`` → ``201`` as ``POST /runs``
``GET /runs/{id}/approvals``                 the run's tool calls waiting for a decision
``POST /runs/{id}/approvals/{call_id}``      ``{"decision": "approve" | "deny" | "edit",
                            "reason"?, "input"?}`` → ``200`` (:mod:`trioflow.approvals`)
``GET /runs/{id}/events``   the run's events as Server-Sent Events (:mod:`trioflow.web._sse`);
                            ``/events.ndjson``: as newline-delimited JSON (:mod:`trioflow.web._ndjson`);
                            ``/events.agui``: as AG-UI events (:mod:`trioflow.web._agui`);
                            ``/events.vercel``: as a Vercel AI SDK UI message stream;
                            or ``?format=`` / ``Accept`` (:mod:`trioflow.web._formats`)
``POST /agui``              an AG-UI ``RunAgentInput`` → the run's AG-UI event stream
``POST /vercel/chat``       ``useChat``'s default transport: a chat (a thread)'s next run,
                            answered with its UI message stream; ``GET
                            /vercel/chat/{id}/stream`` resumes it, ``GET
                            /vercel/chat/{id}/messages`` lists its UI messages (:mod:`trioflow.web._vercel`)
``/runs/{id}/ws``, ``/ws``  WebSockets (:mod:`trioflow.web._ws`)
``GET /metrics``            Prometheus text metrics, only when ``create_app(metrics=...)``
                            was given (``404`` otherwise); it needs the token like every
                            other API endpoint (a scraper sends ``Authorization: Bearer``)
==========================  ===============================================================

Every answer is JSON; errors are ``{"error": {"code", "message"}}`` with a
fitting status (:mod:`trioflow.web._errors`). Access control (token,
``Origin``) is :mod:`trioflow.web._auth`. Starlette does the routing and the
request handling; it runs on Trio through anyio.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, cast

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from trioflow.agent import Agent
from trioflow.executor import RunStatus, StreamingFlowExecutor
from trioflow.handle import CancelMode, RunHandle
from trioflow.web._agui import run_agui, start_agui
from trioflow.web._auth import AccessControl, AccessPolicy
from trioflow.web._body import read_json
from trioflow.web._config import WebConfig
from trioflow.web._errors import EXCEPTION_HANDLERS, ApiError
from trioflow.web._formats import choose_format
from trioflow.web._ndjson import run_ndjson
from trioflow.web._runs import AgentFactory, RunHub, RunRequest, cancel_mode
from trioflow.web._sse import EventStreamResponse, event_stream_answer
from trioflow.web._vercel import (
    CHAT_PATH,
    run_vercel,
    vercel_chat,
    vercel_chat_messages,
    vercel_chat_stream,
)
from trioflow.web._ws import run_socket, socket

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from trioflow.redis import RedisRunStore

__all__ = ["MetricsRenderer", "access_policy", "create_app", "direct_writes", "hub_of"]

MetricsRenderer: TypeAlias = Callable[[], tuple[bytes, str]]
"""Renders metrics for ``GET /metrics``: returns the body and its ``Content-Type``
(``lambda: (prometheus.render(), prometheus.content_type)`` for a
:class:`~trioflow.telemetry.PrometheusMetrics`)."""

_SURROGATE = re.compile(r"[\ud800-\udfff]")

_log = logging.getLogger("trioflow.web")


def _hub(request: Request) -> RunHub:
    return cast("RunHub", request.app.state.trioflow)


_Conn = TypeVar("_Conn", "Request", "WebSocket")


def _resolving(endpoint: Callable[[_Conn], Awaitable[Any]]) -> Callable[[_Conn], Awaitable[Any]]:
    """``endpoint`` about one run, after :meth:`RunHub.resolve` looked the run up in the store."""

    async def resolved(conn: _Conn) -> Any:
        await cast("RunHub", conn.app.state.trioflow).resolve(conn.path_params["run_id"])
        return await endpoint(conn)

    resolved.__name__ = endpoint.__name__
    resolved.__doc__ = endpoint.__doc__
    return resolved


def hub_of(app: Starlette) -> RunHub:
    """The :class:`~trioflow.web._runs.RunHub` of an app made by :func:`create_app`.

    Raises:
        TypeError: ``app`` was not made by :func:`create_app`.
    """
    hub = getattr(getattr(app, "state", None), "trioflow", None)
    if not isinstance(hub, RunHub):
        raise TypeError(f"{app!r} was not made by trioflow.web.create_app")
    return hub


def run_links(request: Request, run: RunHandle) -> dict[str, str]:
    """Absolute URLs of a run's resources: ``url``, ``events_url`` and ``ws_url``."""
    return {
        "url": str(request.url_for("run", run_id=run.run_id)),
        "events_url": str(request.url_for("run_events", run_id=run.run_id)),
        "ws_url": str(request.url_for("run_socket", run_id=run.run_id)),
    }


def _json_safe(value: Any) -> Any:
    """``value`` made encodable: non-finite floats as ``null``, lone surrogates as U+FFFD.

    JSON has no non-finite numbers (a replay's ``speed`` may be inf), UTF-8
    no lone surrogates (a run started in-process may hold one in its task).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return value if value.isascii() else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_json_safe(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _view(request: Request, run: RunHandle) -> dict[str, Any]:
    view: dict[str, Any] = _json_safe(run.to_dict())
    return {**view, **run_links(request, run)}


# -- endpoints ----------------------------------------------------------------------


async def page(request: Request) -> Response:
    """``GET /``: the browser page."""
    index = _hub(request).config.static_dir / "index.html"
    if not index.is_file():
        raise ApiError(404, "not_found", "the browser page is not installed")
    return FileResponse(index, headers={"Cache-Control": "no-cache"})


async def healthz(request: Request) -> Response:
    """``GET /healthz``: ``{"status": "ok"}``, or ``503`` while shutting down."""
    if _hub(request).closing:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def runs(request: Request) -> Response:
    """``/runs``: ``GET`` lists runs (:func:`list_runs`), ``POST`` starts one (:func:`create_run`)."""
    if request.method == "POST":
        return await create_run(request)
    return await list_runs(request)


async def create_run(request: Request) -> Response:
    """``POST /runs``: validate the body, start the run, answer ``201``."""
    hub = _hub(request)
    if hub.closing:
        raise ApiError(503, "shutting_down", "the server is shutting down; no new runs")
    try:
        run_request = RunRequest.parse(
            await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout)
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    run = await hub.start(run_request, source="http")
    links = run_links(request, run)
    return JSONResponse(
        {"run_id": run.run_id, "status": str(run.status), **links},
        status_code=201,
        headers={"Location": links["url"]},
    )


async def list_runs(request: Request) -> Response:
    """``GET /runs``: the retained runs, oldest first; ``?status=`` filters (comma-separated)."""
    hub = _hub(request)
    wanted: set[RunStatus] | None = None
    raw = request.query_params.getlist("status")
    if raw:
        wanted = set()
        for name in (part.strip() for item in raw for part in item.split(",")):
            try:
                wanted.add(RunStatus(name))
            except ValueError:
                raise ApiError(
                    400,
                    "invalid_status",
                    f"unknown status {name!r}; use {', '.join(s.value for s in RunStatus)}",
                ) from None
    listed = await hub.list_runs()
    runs = [_view(request, run) for run in listed if wanted is None or run.status in wanted]
    return JSONResponse({"runs": runs, "count": len(runs)})


async def get_run(request: Request) -> Response:
    """``GET /runs/{run_id}``: one run's status, progress, counts and result."""
    run = _hub(request).get(request.path_params["run_id"])
    return JSONResponse(_view(request, run))


async def cancel_run(request: Request) -> Response:
    """``POST /runs/{run_id}/cancel``: ``202``, or ``409`` when the run has finished.

    The body is optional: ``{"mode": "after_turn"}`` lets the current model
    turn and its tool calls finish first (:class:`~trioflow.handle.CancelMode`);
    without a body (or with ``"immediate"``) the run is cancelled at once.
    """
    hub = _hub(request)
    run = hub.get(request.path_params["run_id"])
    mode = CancelMode.IMMEDIATE
    if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
        body = await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout)
        if not isinstance(body, dict) or set(body) - {"mode"}:
            raise ApiError(
                400, "invalid_request", 'the body may only be {"mode": "immediate" | "after_turn"}'
            )
        mode = cancel_mode(body.get("mode", "immediate"))
    hub.cancel(run, mode=mode)
    return JSONResponse(
        {
            "run_id": run.run_id,
            "status": str(run.status),
            "cancel_requested": True,
            "mode": str(mode),
        },
        status_code=202,
    )


async def threads(request: Request) -> Response:
    """``POST /threads`` (``{"metadata"?: object}``, or no body): ``201``; ``GET /threads``: the list."""
    hub = _hub(request)
    if request.method == "GET":
        listing = [
            {
                "thread_id": t.thread_id,
                "created_at": t.created_at,
                "messages": t.message_count,
                "runs": len(t.runs),
                "running": t.running,
            }
            for t in await hub.list_threads()
        ]
        return JSONResponse({"threads": listing})
    metadata: dict[str, Any] | None = None
    if request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers:
        body = await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout)
        if not isinstance(body, dict) or set(body) - {"metadata"}:
            raise ApiError(400, "invalid_request", 'the body may only be {"metadata": {...}}')
        given = body.get("metadata")
        if given is not None and not isinstance(given, dict):
            raise ApiError(400, "invalid_request", "'metadata' must be an object")
        metadata = given
    thread = await hub.create_thread(metadata)
    url = str(request.url_for("thread", thread_id=thread.thread_id))
    return JSONResponse(
        {"thread_id": thread.thread_id, "url": url}, status_code=201, headers={"Location": url}
    )


async def get_thread(request: Request) -> Response:
    """``GET /threads/{thread_id}``: its messages, runs and the run going."""
    return JSONResponse(
        _json_safe((await _hub(request).thread(request.path_params["thread_id"])).to_dict())
    )


async def thread_runs(request: Request) -> Response:
    """``POST /threads/{thread_id}/runs``: the conversation's next run, answered as ``POST /runs``."""
    hub = _hub(request)
    thread = await hub.thread(request.path_params["thread_id"])
    if hub.closing:
        raise ApiError(503, "shutting_down", "the server is shutting down; no new runs")
    try:
        run_request = RunRequest.parse(
            await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout),
            task_field="message",
        )
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    run = await hub.start(run_request, source="http", thread=thread)
    links = run_links(request, run)
    return JSONResponse(
        {"run_id": run.run_id, "thread_id": thread.thread_id, "status": str(run.status), **links},
        status_code=201,
        headers={"Location": links["url"]},
    )


async def list_approvals(request: Request) -> Response:
    """``GET /runs/{run_id}/approvals``: the run's tool calls waiting for a decision."""
    run = _hub(request).get(request.path_params["run_id"])
    return JSONResponse(
        {"run_id": run.run_id, "approvals": [p.to_dict() for p in run.pending_approvals()]}
    )


async def decide_approval(request: Request) -> Response:
    """``POST /runs/{run_id}/approvals/{call_id}``: approve, deny or edit a waiting tool call.

    ``200`` ``{"run_id", "call_id", "decision"}``; the errors of
    :meth:`~trioflow.web._runs.RunHub.decide`.
    """
    hub = _hub(request)
    run = hub.get(request.path_params["run_id"])
    call_id = request.path_params["call_id"]
    body = await read_json(request, hub.config.max_body, body_timeout=hub.config.body_timeout)
    decided = await hub.decide(run, call_id, body)
    return JSONResponse(
        {"run_id": run.run_id, "call_id": call_id, "decision": str(decided.decision)}
    )


async def run_events(request: Request) -> Response:
    """``GET /runs/{run_id}/events``: Server-Sent Events from ``Last-Event-ID`` / ``?after=``.

    In another wire format when ``?format=`` or ``Accept`` asks for one
    (:func:`~trioflow.web._formats.choose_format`).

    Raises:
        ApiError: ``400`` ``invalid_format``, and as the format's endpoint.
    """
    fmt = choose_format(request.scope.get("query_string", b""), request.scope["headers"])
    if fmt != "sse":
        return await _FORMAT_ENDPOINTS[fmt](request)
    hub = _hub(request)
    # The access rules were applied by the middleware (AccessControl).
    answer = event_stream_answer(hub, None, request.scope, request.path_params["run_id"])
    if isinstance(answer, Response):
        return answer
    return EventStreamResponse(hub, *answer)


_FORMAT_ENDPOINTS: dict[str, Callable[[Request], Awaitable[Response]]] = {
    "ndjson": run_ndjson,
    "agui": run_agui,
    "vercel": run_vercel,
}
"""The endpoint of each format but trioflow's SSE (the run was resolved already)."""


def _metrics_endpoint(render: MetricsRenderer) -> Callable[[Request], Any]:
    async def metrics(request: Request) -> Response:
        """``GET /metrics``: the metrics in the Prometheus text format."""
        body, content_type = render()
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-cache"})

    return metrics


def create_app(
    executor: StreamingFlowExecutor,
    *,
    agent: Agent | AgentFactory | None = None,
    config: WebConfig | None = None,
    metrics: MetricsRenderer | None = None,
    store: RedisRunStore | None = None,
    enqueue: bool = False,
) -> Starlette:
    """Make the ASGI application serving ``executor``'s runs.

    Serve it with :func:`~trioflow.web.serve` (graceful shutdown included) or
    any ASGI server running on Trio. While the application's lifespan runs,
    runs live in a nursery of its own; without a lifespan, the executor must
    be open (``async with executor:``).

    Args:
        executor: starts, registers and retains the runs (its ``retention``
            bounds ``GET /runs``, its ``history`` how far back a client can resume).
        agent: the :class:`~trioflow.Agent` for every run, or an
            :data:`~trioflow.web.AgentFactory` building one per
            :class:`~trioflow.web.RunRequest`; ``None`` for
            :func:`trioflow.demo.default_agent` (the demo agent).
        config: the options (:class:`~trioflow.web.WebConfig`); the defaults if ``None``.
        metrics: a :data:`MetricsRenderer` to serve on ``GET /metrics``
            (called on every request, so keep it quick); ``None``: no
            ``/metrics`` endpoint (``404``). The endpoint is not public: with
            a token it needs ``Authorization: Bearer <token>``, like ``/runs``.
        store: serve every run of this Redis store, not only the executor's
            (:doc:`/howto/deploy`): ``GET /runs`` lists the store's runs, and
            the routes about one run serve a run executed by any process (a
            :class:`~trioflow.redis.RemoteRun`, followed through the node's
            tail); ``404`` only when the store has no such run. The executor
            must keep its runs there (``history_store=store.history_factory()``,
            ``run_ids=new_run_id``). Event streams then go through the
            application rather than straight to the socket (the direct
            socket writes need no store lookup; with one, ``GET
            /runs/{id}/events`` and ``/runs/{id}/ws`` go through the ASGI
            path). The multiplexed ``/ws`` looks a run up in the store for
            ``resume``, ``cancel`` and ``decide``.
        enqueue: with a ``store``, queue the runs started here
            (:func:`~trioflow.redis.submit`) for workers
            (:func:`~trioflow.redis.open_worker`, ``trioflow worker``)
            instead of executing them on ``executor``; each is served as a
            :class:`~trioflow.redis.RemoteRun`. The workers build its agent
            from the request by the same rule (:func:`~trioflow.web.open_request_agent`),
            so they must allow the same models. A thread's runs are queued
            too: with a ``store`` the threads are kept in Redis
            (:class:`~trioflow.redis.RedisThreads`), served from any node.

    Raises:
        ValueError: a ``store`` with an executor that does not write to it,
            or ``enqueue`` without a ``store``.

    Returns:
        A Starlette application; ``app.state.trioflow`` is its
        :class:`~trioflow.web._runs.RunHub`.
    """
    config = config or WebConfig()
    hub = RunHub(executor, agent, config, store=store, enqueue=enqueue)
    routes: list[BaseRoute] = [
        Route("/", page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/runs", runs, methods=["GET", "POST"], name="runs"),
        Route("/runs/{run_id}", _resolving(get_run), methods=["GET"], name="run"),
        Route("/runs/{run_id}/approvals", _resolving(list_approvals), methods=["GET"]),
        Route("/threads", threads, methods=["GET", "POST"], name="threads"),
        Route("/threads/{thread_id}", get_thread, methods=["GET"], name="thread"),
        Route("/threads/{thread_id}/runs", thread_runs, methods=["POST"]),
        Route("/runs/{run_id}/approvals/{call_id}", _resolving(decide_approval), methods=["POST"]),
        Route("/runs/{run_id}/cancel", _resolving(cancel_run), methods=["POST"]),
        Route("/runs/{run_id}/events", _resolving(run_events), methods=["GET"], name="run_events"),
        Route("/runs/{run_id}/events.ndjson", _resolving(run_ndjson), methods=["GET"]),
        Route("/runs/{run_id}/events.agui", _resolving(run_agui), methods=["GET"]),
        Route("/agui", start_agui, methods=["POST"], name="agui"),
        Route("/runs/{run_id}/events.vercel", _resolving(run_vercel), methods=["GET"]),
        Route(CHAT_PATH, vercel_chat, methods=["POST"], name="vercel_chat"),
        Route(CHAT_PATH + "/{chat_id}/stream", vercel_chat_stream, methods=["GET"]),
        Route(CHAT_PATH + "/{chat_id}/messages", vercel_chat_messages, methods=["GET"]),
        WebSocketRoute("/runs/{run_id}/ws", _resolving(run_socket), name="run_socket"),
        WebSocketRoute("/ws", socket, name="socket"),
        Mount("/static", StaticFiles(directory=config.static_dir, check_dir=False), name="static"),
    ]
    if metrics is not None:
        routes.append(
            Route("/metrics", _metrics_endpoint(metrics), methods=["GET"], name="metrics")
        )
    policy = AccessPolicy(
        token=config.token,
        allowed_origins=config.allowed_origins,
        allowed_hosts=config.host_allow_list,
    )
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AccessControl, policy=policy)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=hub.lifespan,
    )
    app.state.trioflow = hub
    app.state.trioflow_access = policy
    app.state.trioflow_middleware = tuple(app.user_middleware)
    return app


def access_policy(app: Starlette) -> AccessPolicy:
    """The :class:`~trioflow.web._auth.AccessPolicy` of an app made by :func:`create_app`.

    Raises:
        TypeError: ``app`` was not made by :func:`create_app`.
    """
    hub_of(app)
    policy: AccessPolicy = app.state.trioflow_access
    return policy


def direct_writes(app: Starlette) -> bool:
    """Whether event streams of ``app`` may write straight to the socket.

    True when its :class:`~trioflow.web.WebConfig` allows it, the app
    serves no Redis store (a run is looked up there first, which the direct
    path cannot await) and no ASGI middleware was added after
    :func:`create_app` (middleware wrapping ``send`` must see every body it
    wraps).

    Raises:
        TypeError: ``app`` was not made by :func:`create_app`.
    """
    hub = hub_of(app)
    own = getattr(app.state, "trioflow_middleware", None)
    return hub.config.direct_writes and hub.store is None and own == tuple(app.user_middleware)
