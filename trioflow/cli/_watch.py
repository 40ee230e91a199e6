"""``trioflow watch``: show a run that is going on a trioflow server, like ``trioflow run``.

``trioflow watch URL [--run ID] [--json | --plain] [--token TOKEN] [--after SEQ]
[--types T1,T2 [--custom-type TYPE]]`` follows the run's events from the server and shows them with the same
renderers as ``trioflow run`` (the live view, ``--plain`` text, or ``--json``
lines, byte for byte the events the server sent). URL is one of:

* a run's events URL, ``http://host:port/runs/ID/events`` (what ``POST /runs``
  answers as ``events_url``);
* a run's URL, ``http://host:port/runs/ID``;
* the server's URL, ``http://host:port``, with ``--run ID``;
* a run's WebSocket URL, ``ws://host:port/runs/ID/ws`` (or the server's
  ``ws://`` URL with ``--run ID``), to follow it over a WebSocket instead.

``--types`` shows only the events of those types (comma-separated,
repeatable); the watch still ends with the run's terminal event, whose type
sets the exit status. Names must be :class:`~trioflow.EventType` values or
custom types given with ``--custom-type``: an unknown name (such as the old
short name ``token``) is bad usage (exit status 2, the message lists the
valid names).

Over HTTP, a dropped connection is resumed where it stopped. The token
comes from ``--token`` or the ``TRIOFLOW_TOKEN`` environment variable.

Exit status: 0 when the run completed, 1 when it failed or was cancelled (or
the server could not be reached, or refused), 2 for bad usage, 130 on Ctrl-C
(watching stops; the run goes on on the server).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO

import trio

from trioflow._util import collapse_single_group
from trioflow.cli._common import TOKEN_ENV, add_output_options, non_negative_int, watch_signals
from trioflow.cli._console import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    detach_stdout,
    exit_status,
    open_renderer,
)
from trioflow.events import EventType, FlowEvent, check_event_types
from trioflow.supervise import RetryPolicy

__all__ = ["HELP", "add_arguments", "events_url", "main", "selected_types"]

HELP = "show the events of a run going on a trioflow server, as 'trioflow run' does"
"""The subcommand's one-line help."""

_RETRY = RetryPolicy(attempts=6, base_delay=0.25, max_delay=5.0)
"""Reconnect attempts in a row without a new event before giving up (about 8 s in all)."""


def events_url(url: str, run_id: str | None = None) -> str:
    """The URL to follow for ``url`` (and ``run_id``): a run's events URL or WebSocket URL.

    Args:
        url: a run's events URL (``.../runs/ID/events``), a run's URL
            (``.../runs/ID``), a run's WebSocket URL (``.../runs/ID/ws``) or
            the server's URL (with ``run_id``).
        run_id: the run, when ``url`` is the server's URL; if ``url`` names
            a run too, both must agree.

    Returns:
        ``http(s)://.../runs/ID/events`` or ``ws(s)://.../runs/ID/ws``, with
        ``url``'s query string kept.

    Raises:
        ValueError: the scheme is not ``http``, ``https``, ``ws`` or ``wss``,
            no run is named, or ``url`` and ``run_id`` name different runs.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {url!r}")
    websocket = parts.scheme in ("ws", "wss")
    segments = [s for s in parts.path.split("/") if s]
    named: str | None = None
    base = segments
    if len(segments) >= 2 and segments[-2] == "runs":
        named, base = segments[-1], segments[:-2]
    elif len(segments) >= 3 and segments[-3] == "runs" and segments[-1] in ("events", "ws"):
        named, base = segments[-2], segments[:-3]
        websocket = websocket or segments[-1] == "ws"
    elif segments and segments[-1] == "ws":
        base = segments[:-1]
    named = urllib.parse.unquote(named) if named is not None else None
    if named is not None and run_id is not None and named != run_id:
        raise ValueError(f"the URL names run {named!r} but --run says {run_id!r}")
    rid = named or run_id
    if rid is None:
        raise ValueError(
            f"{url} names no run: give a run's URL (.../runs/ID/events) or add --run ID"
        )
    scheme = parts.scheme
    if websocket:
        scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    path = "/".join(
        ["", *base, "runs", urllib.parse.quote(rid, safe=""), "ws" if websocket else "events"]
    )
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``trioflow watch`` to ``parser``."""
    parser.add_argument(
        "url",
        help="a run's events URL (http://HOST:PORT/runs/ID/events), its URL or ws_url, "
        "or the server's URL with --run",
    )
    parser.add_argument("--run", metavar="ID", default=None, help="the run, with a server URL")
    add_output_options(parser)
    parser.add_argument(
        "--token", default=None, help=f"the server's bearer token (default: ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--after",
        type=non_negative_int,
        default=None,
        metavar="SEQ",
        help="start after this event (default: from the run's first event)",
    )
    parser.add_argument(
        "--types",
        action="append",
        default=None,
        metavar="T1,T2",
        help="show only events of these types (comma-separated, repeatable), "
        "e.g. token.received,tool.completed",
    )
    parser.add_argument(
        "--custom-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="a custom event type the server emits, accepted by --types (repeatable)",
    )


def selected_types(args: argparse.Namespace) -> frozenset[str] | None:
    """The event types ``--types`` selects, checked; ``None`` without ``--types``.

    Raises:
        ValueError: a name is neither an :class:`~trioflow.EventType` value nor
            given with ``--custom-type``; the message lists the valid names.
    """
    if not args.types:
        return None
    names = [name.strip() for part in args.types for name in part.split(",") if name.strip()]
    if not names:
        raise ValueError("--types names no event type")
    try:
        return check_event_types(names, extra=frozenset(args.custom_type))
    except TypeError as exc:
        raise ValueError(str(exc)) from None


@asynccontextmanager
async def _open_events(
    url: str, token: str | None, after: int | None
) -> AsyncIterator[AsyncIterator[FlowEvent]]:
    from trioflow.client import sse_events, ws_connect  # the web stack: when watching

    if urllib.parse.urlsplit(url).scheme in ("ws", "wss"):
        if after is not None:
            sep = "&" if "?" in url else "?"
            url = f"{url}{sep}after={after}"
        async with ws_connect(url, token=token) as conn:
            yield conn.events()
    else:
        async with sse_events(url, token=token, after=after, retry=_RETRY) as events:
            yield events


async def _watch(
    url: str,
    args: argparse.Namespace,
    token: str | None,
    out: IO[str],
    types: frozenset[str] | None = None,
) -> int:
    interrupted: list[int] = []
    terminal: FlowEvent | None = None
    with collapse_single_group():
        async with trio.open_nursery() as nursery:

            def on_signal(signum: int) -> None:
                interrupted.append(signum)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals, on_signal)
            try:
                async with _open_events(url, token, args.after) as events:
                    stream = aiter(events)
                    first = await anext(stream, None)
                    if first is None:
                        return exit_status(None)
                    title, model = "", ""
                    if first.type == EventType.FLOW_STARTED:
                        title = str(first.data.get("task") or "")
                        model = str(first.data.get("model") or "")
                    with open_renderer(
                        out,
                        json=args.json,
                        plain=args.plain,
                        title=title or str(first.run_id or ""),
                        model=model or "remote",
                    ) as renderer:
                        event: FlowEvent | None = first
                        while event is not None:
                            if types is None or event.type in types:
                                renderer.show(event)
                            if event.is_terminal():
                                terminal = event
                                break
                            event = await anext(stream, None)
            finally:
                nursery.cancel_scope.cancel()
    return exit_status(terminal, interrupted=bool(interrupted))


def main(args: argparse.Namespace) -> int:
    """Run ``trioflow watch`` with parsed ``args``; return the exit status."""
    import httpx
    from trio_websocket import ConnectionClosed, HandshakeError

    from trioflow.client import StreamError

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        url = events_url(args.url, args.run)
        types = selected_types(args)
    except ValueError as exc:
        print(f"trioflow watch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return trio.run(_watch, url, args, token, sys.stdout, types)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return detach_stdout()
    except StreamError as exc:
        hint = f" (pass --token or set ${TOKEN_ENV})" if exc.status == 401 else ""
        print(
            f"trioflow watch: the server refused: {exc.message} [{exc.code}]{hint}", file=sys.stderr
        )
        return EXIT_FAILED
    except (trio.BrokenResourceError, httpx.TransportError, OSError, HandshakeError) as exc:
        print(f"trioflow watch: cannot follow {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ConnectionClosed as exc:
        print(
            f"trioflow watch: the connection closed before the run ended: {exc.reason}",
            file=sys.stderr,
        )
        return EXIT_FAILED
