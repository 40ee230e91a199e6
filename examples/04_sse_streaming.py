"""Tutorial 4: serve runs over Server-Sent Events, and follow one as a client.

Two halves of the same program:

* ``serve`` starts the web server (:func:`trioflow.web.create_app` and
  :func:`trioflow.web.serve`) on http://127.0.0.1:8080 with the browser page,
  ``POST /runs`` and ``GET /runs/{id}/events``. Ctrl-C shuts it down
  gracefully: running runs end with ``flow.cancelled`` and streams close.
* Without ``serve``, a self-check: the same server starts in this process on
  a free port, a run is started with an ``httpx`` ``POST /runs``, and its
  events are read with :func:`trioflow.client.sse_events`, the client that
  resumes with ``Last-Event-ID`` when a connection drops. The tokens and the
  terminal event are printed, then the server shuts down.

Run it::

    python examples/04_sse_streaming.py            # the self-check
    python examples/04_sse_streaming.py serve      # then open http://127.0.0.1:8080

It works offline with the scripted model; with ``ANTHROPIC_API_KEY`` set it
talks to Claude instead. ``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the
scripted model's tokens per second; 0 streams as fast as possible.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal

import httpx
import trio

from trioflow import Agent, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.client import sse_events
from trioflow.models import Model, ScriptedModel, open_model
from trioflow.web import AgentFactory, RunRequest, WebConfig, create_app, serve


def agent_factory(model: Model) -> AgentFactory:
    """One agent per run; the scripted model keeps per-run state, so each run gets its own."""

    def make(request: RunRequest) -> Agent:
        run_model = ScriptedModel(pace=model.pace) if isinstance(model, ScriptedModel) else model
        return Agent(run_model, tools=[calculator])

    return make


async def serve_until_interrupted(model: Model, port: int) -> None:
    """``serve``: the server and its browser page, until Ctrl-C (or SIGTERM)."""
    app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                print("shutting down: running runs end with flow.cancelled")
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        config = WebConfig(port=port)
        urls = await nursery.start(
            functools.partial(serve, app, config, shutdown_trigger=stop.wait)
        )
        print(f"serving on {urls[0]} (model: {model.name}); open it in a browser, Ctrl-C to stop")
        print(
            f"try: curl -X POST {urls[0]}/runs -H 'Content-Type: application/json' "
            f'-d \'{{"task": "What is 25 * 4?"}}\''
        )
        await stop.wait()
        # serve() drains the runs, then returns; the signal watcher has returned already.
    print("stopped")


async def self_check(model: Model, task: str) -> None:
    """Start a server on a free port, run ``task`` through it over HTTP and SSE, stop it."""
    app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
        )
        base = urls[0]
        print(f"server listening on {base} (model: {model.name})")

        async with httpx.AsyncClient() as http:
            response = await http.post(f"{base}/runs", json={"task": task})
            response.raise_for_status()
            run = response.json()
        print(f"POST /runs -> {response.status_code}: run {run['run_id']}")
        print(f"GET {run['events_url']}")

        async with sse_events(run["events_url"]) as events:
            async for event in events:
                if event.type == "token.received":
                    print(event.data["token"], end="", flush=True)
                elif event.type == "tool.completed":
                    print(f"\n[{event.seq:>2}] tool.completed: {event.data['result']}")
                elif event.is_terminal():
                    print(f"\n[{event.seq:>2}] {event.type} (terminal event)")
                    if event.type == "flow.completed":
                        print(f"Answer: {event.data['output']}")

        stop.set()  # graceful shutdown: serve() returns once streams have closed
    print("server stopped")


async def main(args: argparse.Namespace) -> None:
    async with open_model(pace=args.pace) as model:
        if args.command == "serve":
            await serve_until_interrupted(model, args.port)
        else:
            await self_check(model, args.task)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve runs over SSE; or check it as a client.")
    parser.add_argument("command", nargs="?", choices=["serve"], help="run the server")
    parser.add_argument("--task", default="What is 25 * 4?", help="the self-check's task")
    parser.add_argument("--port", type=int, default=8080, help="the port of 'serve'")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    trio.run(main, parser.parse_args())
