"""``trioflow serve``: the HTTP/SSE/WebSocket API and the browser page.

``trioflow serve [--host 127.0.0.1] [--port 8080] [--model ...] [--token TOKEN]``
``[--allowed-host HOST ...] [--allow-model MODEL ...] [--timeout S] [--write-timeout S]``
``[--shutdown-timeout S]``
``[--max-connections N] [--certfile PEM --keyfile PEM] [--metrics] [--replay FILE [--speed X]]``
``[--redis URL [--workers N]]`` serves until SIGINT or SIGTERM,
then shuts down gracefully: running runs end with ``flow.cancelled``, streams
deliver it and close, and after ``--shutdown-timeout`` seconds (10) every
connection still open is closed by force. A second signal stops at once
(runs still end with ``flow.cancelled``; streams may not deliver it). The
token may also come from the ``TRIOFLOW_TOKEN`` environment variable; from
either source it must be 8 to 4096 printable ASCII characters without white
space (exit status 2 otherwise). ``--allowed-host`` adds a name clients may
reach the server by (the ``Host`` header); binding a wildcard address
(``--host 0.0.0.0``) requires at least one. ``--allow-model`` names a model
a request may ask for (``"model"`` of ``POST /runs``); without it, every run
uses ``--model``.

Every run has a time limit, ``--timeout`` (default 900 s, or
``TRIOFLOW_TIMEOUT``; ``0`` for none), so that no run holds a slot for ever;
a peer that takes nothing for ``--write-timeout`` seconds (30) is
disconnected; beyond ``--max-connections`` new connections get ``503``.

``--certfile`` and ``--keyfile`` (or ``TRIOFLOW_CERTFILE`` and
``TRIOFLOW_KEYFILE``) serve HTTPS instead of HTTP, with HTTP/2 for the
clients that negotiate it (browsers do): a PEM certificate chain and its
unencrypted key. Both or neither, readable and matching (exit status 2
otherwise); the printed URLs are then ``https://``.

Exit status: 0 after a shutdown (graceful or after a second signal), 1 when
the server could not start (address in use, model unavailable), 2 for bad usage.

``--metrics`` serves OpenTelemetry metrics of every run on ``GET /metrics`` in
the Prometheus text format: the executor emits every run's events into one
shared bus, which a :class:`~trioflow.telemetry.Telemetry` listens to. The
endpoint needs the token like the rest of the API, when one is set.

``--replay FILE`` plays a recording (``trioflow run --json`` output) as a run
of the server, at ``--speed`` (``inf``: no delays), each pause capped at
``--max-gap`` recorded seconds (default 5; ``inf``: no cap): ``/runs/{id}``,
``/runs/{id}/events`` and the WebSockets serve it like a live run, from its
first event whenever a client connects. Its events URL is printed on startup.
A recording that holds no events, or whose first line is not an event, is
not served: the command exits with status 1 and a one-line message. A later
line that is not an event ends the replay with an ``error`` event, after the
valid events before it. Warnings about the recording (see
:class:`~trioflow.recording.RecordingWarning`) are printed on standard error,
at most 10 of a kind.

``--redis URL`` (``redis://host:port/db`` or ``unix:///path``; needs
``trioflow[redis]``) makes the server a node of a deployment on Redis
(:doc:`/howto/deploy`): the runs it starts are executed here with their
events and records in Redis, and it serves every run of that Redis, whichever
process executes it (``GET /runs`` lists them; ``404`` only for a run Redis
does not hold); a cancel request reaches the process executing the run. The
URL is checked at start-up (unreachable: exit status 1).

``--workers N`` (with ``--redis`` only; exit status 2 otherwise) makes the
node queue the runs it starts (``POST /runs``, a ``/ws`` ``start``;
:func:`trioflow.redis.submit`) instead of executing them, and serve each
from Redis like any other process's run, a thread's runs too. With
``--redis`` the threads (``/threads``) are kept in Redis
(:class:`trioflow.redis.RedisThreads`): every node serves them, a
thread's next run may be posted to any node, and they survive a restart.
With ``N`` >= 1 the process also runs a worker
(:func:`trioflow.redis.open_worker`) executing at most ``N`` queued runs at
once, with the same model, ``--allow-model`` list, ``--max-iterations`` and
``--timeout`` as the node; with ``0``, separate ``trioflow worker``
processes execute them (give them the same ``--allow-model``). On SIGINT or
SIGTERM the server shuts down first, then the worker stops taking runs and
lets its runs finish for at most ``--shutdown-timeout`` seconds before
cancelling them (``flow.cancelled``); a second signal cancels them at once.

Under systemd (``Type=notify``), the server tells the service manager
``READY=1`` once it listens (and its workers are ready) and ``STOPPING=1``
when a graceful shutdown begins, as :func:`trioflow.cli._common.notify`
does for ``trioflow worker``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

import trio

from trioflow._util import collapse_single_group
from trioflow.cli._common import (
    TOKEN_ENV,
    add_allow_model_option,
    add_max_gap_option,
    add_model_option,
    add_pace_option,
    add_timeout_option,
    at_least_one,
    non_negative_int,
    notify,
    playback_speed,
    port,
    positive_float,
    print_warnings,
    stop_on_signals,
)
from trioflow.cli._console import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from trioflow.executor import StreamingFlowExecutor
from trioflow.models import ModelError, open_model
from trioflow.recording import RecordingError, ReplayRun, empty_recording, start_replay
from trioflow.settings import Settings, check_token

if TYPE_CHECKING:
    from trioflow.bus import EventBus
    from trioflow.redis import RedisRunStore, Worker
    from trioflow.web._app import MetricsRenderer
    from trioflow.web._config import WebConfig
    from trioflow.web._runs import AgentFactory

__all__ = ["DEFAULT_RUN_TIMEOUT", "HELP", "add_arguments", "main"]

DEFAULT_RUN_TIMEOUT = 900.0
"""The time limit of a served run unless ``--timeout`` or ``TRIOFLOW_TIMEOUT`` say otherwise:
no run holds a slot for ever."""

HELP = "serve runs over HTTP, Server-Sent Events and WebSockets, with a browser page"
"""The subcommand's one-line help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``trioflow serve`` to ``parser``; defaults come from :class:`Settings`.

    Raises:
        SettingsError: a ``TRIOFLOW_*`` variable has a bad value.
    """
    from trioflow.web._config import WebConfig  # light: no web stack

    defaults = WebConfig()
    settings = Settings.from_env()
    parser.add_argument(
        "--host",
        default=settings.host,
        help=f"interface (default: $TRIOFLOW_HOST or {settings.host})",
    )
    parser.add_argument(
        "--port",
        type=port,
        default=settings.port,
        help=f"TCP port; 0 picks a free one (default: $TRIOFLOW_PORT or {settings.port})",
    )
    add_model_option(parser, settings, env_in_help=False)
    add_pace_option(parser)
    parser.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, if set); "
        "8 to 4096 printable ASCII characters without white space, from either source",
    )
    add_allow_model_option(parser)
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also answer requests whose Host header names HOST ('name' for any port, "
        "'name:port', '*' for any Host: no DNS-rebinding protection); repeatable. "
        "Always allowed: localhost, 127.0.0.1 and [::1] when bound to loopback or a "
        "wildcard, and the --host address. Required with --host 0.0.0.0 or ::; "
        "others get 403 forbidden_host (GET /healthz answers any Host)",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also allow WebSockets and POSTs from this origin (repeatable; '*' for any)",
    )
    add_timeout_option(parser, settings, default=DEFAULT_RUN_TIMEOUT)
    parser.add_argument(
        "--max-iterations",
        type=at_least_one,
        default=settings.max_iterations,
        help="default iteration budget",
    )
    parser.add_argument(
        "--keepalive",
        type=positive_float,
        default=settings.keepalive,
        help="seconds of silence before a keepalive (default: $TRIOFLOW_KEEPALIVE or 15)",
    )
    parser.add_argument(
        "--buffer",
        type=at_least_one,
        default=256,
        help="events buffered per connection before a slow client is evicted (default: 256)",
    )
    parser.add_argument(
        "--write-timeout",
        type=positive_float,
        default=defaults.write_timeout,
        help="seconds a peer may take nothing before its connection is closed (default: 30)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=positive_float,
        default=defaults.shutdown_timeout,
        help="seconds a graceful shutdown may take before connections are closed by force "
        "(default: 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=at_least_one,
        default=None,
        help="connections open at once; beyond it new ones get 503 "
        "(default: what the file-descriptor limit leaves room for)",
    )
    parser.add_argument(
        "--certfile",
        default=settings.certfile,
        metavar="PEM",
        help="serve HTTPS (HTTP/2 and HTTP/1.1) with this certificate chain; needs --keyfile "
        "(default: $TRIOFLOW_CERTFILE)",
    )
    parser.add_argument(
        "--keyfile",
        default=settings.keyfile,
        metavar="PEM",
        help="the unencrypted private key of --certfile (default: $TRIOFLOW_KEYFILE)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="serve OpenTelemetry metrics on GET /metrics (Prometheus text format)",
    )
    parser.add_argument(
        "--replay",
        default=None,
        metavar="FILE",
        help="also serve this recording (trioflow run --json output) as a run",
    )
    parser.add_argument(
        "--speed",
        type=playback_speed,
        default=1.0,
        help="the replay's playback speed: 2 is twice as fast, 'inf' without delays (default: 1)",
    )
    add_max_gap_option(parser, prefix="the replay's pauses: ")
    parser.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="keep runs in this Redis and serve every run it holds "
        "(redis://host:port/db or unix:///path; needs trioflow[redis])",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="with --redis: queue the runs started here for workers, and run N of them in "
        "this process (0: only separate 'trioflow worker' processes execute them). "
        "Without it, this process executes the runs it starts",
    )


def _history_for(path: str) -> int:
    """A replay history holding the whole recording, so late clients see every event.

    Raises:
        RecordingError: the recording holds no events (only blank lines, if any).
        OSError: it cannot be read.
    """
    with open(path, "rb") as file:
        lines = sum(1 for line in file if line.strip())
    if not lines:
        raise empty_recording(path)
    return max(4096, lines + 16)


async def _start_replay(
    path: str, speed: float, max_gap: float, nursery: trio.Nursery, err: IO[str]
) -> ReplayRun:
    replay = await start_replay(
        path,
        nursery=nursery,
        speed=speed,
        max_gap=max_gap,
        history=_history_for(path),
        on_warning=print_warnings("serve", err),
    )
    if not replay.run_id:
        replay.cancel("no run id")
        raise RecordingError(path, 0, "the first event has no run id")
    return replay


async def _serve(args: argparse.Namespace, config: WebConfig, err: IO[str]) -> int:
    # The web stack, imported when serving only: the parser stays light.
    from trioflow.web._app import create_app, hub_of
    from trioflow.web._defaults import agent_factory, open_metrics
    from trioflow.web._server import serve

    async with AsyncExitStack() as stack:
        model = await stack.enter_async_context(open_model(args.model, pace=args.pace))
        metrics: MetricsRenderer | None = None
        bus: EventBus | None = None
        if args.metrics:
            bus, metrics = await stack.enter_async_context(open_metrics())
        store: RedisRunStore | None = None
        if args.redis is not None:
            from trioflow.redis import RedisRunStore, new_run_id, open_redis

            try:
                client = await stack.enter_async_context(open_redis(args.redis))
            except ValueError:
                raise
            except Exception as exc:  # coredis's ConnectionError, AuthenticationError, ...
                print(f"trioflow serve: cannot reach Redis at {args.redis}: {exc}", file=err)
                return EXIT_FAILED
            store = RedisRunStore(client)
            executor = StreamingFlowExecutor(
                bus=bus,
                timeout=args.timeout or None,
                history_store=store.history_factory(),
                run_ids=new_run_id,
            )
        else:
            executor = StreamingFlowExecutor(bus=bus, timeout=args.timeout or None)
        factory = agent_factory(model, max_iterations=args.max_iterations)
        app = create_app(
            executor,
            agent=factory,
            config=config,
            metrics=metrics,
            store=store,
            enqueue=args.workers is not None,
        )
        stop = trio.Event()
        served = trio.Event()

        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                replay: ReplayRun | None = None
                if args.replay is not None:
                    try:
                        replay = await _start_replay(
                            args.replay, args.speed, args.max_gap, nursery, err
                        )
                    except RecordingError as exc:
                        print(f"trioflow serve: cannot replay {exc}", file=err)
                        return EXIT_FAILED
                    except OSError as exc:
                        print(f"trioflow serve: cannot replay {args.replay}: {exc}", file=err)
                        return EXIT_FAILED
                    hub_of(app).add_replay(replay)

                stop_on_signals(nursery, stop, err, doing="shutting down")

                async def run_server(*, task_status: trio.TaskStatus[list[str]]) -> None:
                    try:
                        await serve(app, shutdown_trigger=stop.wait, task_status=task_status)
                    finally:
                        served.set()

                async with AsyncExitStack() as workers:
                    if args.workers:
                        await workers.enter_async_context(
                            _open_workers(args, config, factory, err, bus)
                        )
                    urls = await nursery.start(run_server)
                    hint = (
                        " (token required: open /?token=<token> in a browser)"
                        if config.token
                        else ""
                    )
                    extra = f"; metrics on {urls[0]}/metrics" if metrics is not None else ""
                    if store is not None:
                        extra += f"; runs on Redis ({store.owner})"
                    if args.workers is not None:
                        extra += f"; runs queued for workers ({args.workers} in this process)"
                    print(
                        f"trioflow: serving on {', '.join(urls)} with the {model.name} model"
                        f"{hint}{extra}; Ctrl-C to stop",
                        file=err,
                        flush=True,
                    )
                    if replay is not None:
                        print(
                            f"trioflow: replaying {args.replay} as run {replay.run_id}: "
                            f"{urls[0]}/runs/{replay.run_id}/events",
                            file=err,
                            flush=True,
                        )
                    notify("READY=1")
                    await served.wait()
                    # Leaving the stack drains the in-process workers (bounded).
                nursery.cancel_scope.cancel()  # stop watching signals
        print("trioflow: stopped", file=err, flush=True)
        return EXIT_OK


@asynccontextmanager
async def _open_workers(
    args: argparse.Namespace,
    config: WebConfig,
    factory: AgentFactory,
    err: IO[str],
    bus: EventBus | None,
) -> AsyncIterator[Worker]:
    """``--workers N``: one :class:`~trioflow.redis.Worker` of concurrency N in this process.

    Its own Redis client (its blocking queue reads take no connection from
    the node's pool). On leaving, it stops taking runs and lets its runs
    finish for at most ``--shutdown-timeout`` seconds, then cancels them
    (``flow.cancelled``); a second signal cancels them at once. Its runs'
    events are also emitted on ``bus`` (``--metrics``: ``/metrics`` counts them).
    """
    from trioflow.redis import open_worker

    async with open_worker(
        args.redis,
        agent_factory=factory,
        allowed_models=config.allowed_models,
        concurrency=args.workers,
        drain="finish",
        drain_timeout=config.shutdown_timeout,
        run_timeout=args.timeout or None,
        bus=bus,
    ) as worker:
        print(
            f"trioflow: worker {worker.name} ready (concurrency {args.workers})",
            file=err,
            flush=True,
        )
        try:
            yield worker
        finally:
            print("trioflow: draining the workers", file=err, flush=True)


def _token(flag: str | None) -> str | None:
    """The token from ``--token``, else from ``TRIOFLOW_TOKEN``, checked by the same rule.

    Raises:
        SettingsError: the token is not 8 to 4096 printable ASCII characters
            without white space (an HTTP header could not carry it); the
            message names its source, never its value.
    """
    if flag is not None:
        return check_token("--token", flag)
    return Settings.from_env().token


def main(args: argparse.Namespace) -> int:
    """Run ``trioflow serve`` with parsed ``args``; return the exit status."""
    from trioflow.web._config import WebConfig

    if args.workers is not None and args.redis is None:
        print("trioflow serve: --workers needs --redis (runs are queued in Redis)", file=sys.stderr)
        return EXIT_USAGE
    try:
        token = _token(args.token)
        config = WebConfig(
            host=args.host,
            port=args.port,
            token=token,
            allowed_origins=frozenset(args.allow_origin),
            allowed_hosts=frozenset(args.allowed_host),
            allowed_models=tuple(args.allow_model),
            keepalive=args.keepalive,
            buffer=args.buffer,
            write_timeout=args.write_timeout,
            shutdown_timeout=args.shutdown_timeout,
            max_connections=args.max_connections,
            access_log=args.access_log,
            certfile=None if args.certfile is None else Path(args.certfile),
            keyfile=None if args.keyfile is None else Path(args.keyfile),
        )
    except (TypeError, ValueError) as exc:
        print(f"trioflow serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.access_log:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return trio.run(functools.partial(_serve, args, config, sys.stderr))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ImportError as exc:
        extra = "trioflow[redis] for --redis" if args.redis else "trioflow[telemetry] for --metrics"
        print(
            f"trioflow serve: {exc.name or exc} is not installed; install {extra}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except ModelError as exc:
        print(f"trioflow serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"trioflow serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"trioflow serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
