"""Two runs over one WebSocket: start them, follow them by run_id, cancel one.

The server's ``/ws`` endpoint speaks a small JSON protocol: a client starts
runs (``{"action": "start", "task": ...}``), receives the events of every run
it started on the same connection, each tagged with its ``run_id``, and can
cancel a run (``{"action": "cancel", "run_id": ...}``), which then ends with
``flow.cancelled``. :func:`trioflow.client.ws_connect` is the Trio client of
that protocol.

This program starts a server in-process on a free port (the agent's
calculator stands for a remote service 0.2 s away), connects to ``/ws``,
starts two runs, prints their events as they arrive, labelled by run, and
cancels the second run when its tool call starts. It ends with each run's
terminal event.

Run it::

    python examples/websocket_client.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Literal

import trio

from trioflow import Agent, FlowEvent, StreamingFlowExecutor, tool
from trioflow.builtin import evaluate
from trioflow.client import ws_connect
from trioflow.models import Model, ScriptedModel, open_model
from trioflow.web import AgentFactory, RunRequest, WebConfig, create_app, serve


@tool(name="calculator")
async def remote_calculator(operation: Literal["evaluate"], expression: str) -> int | float:
    """Evaluate an arithmetic expression on a calculation service.

    Args:
        operation: Always "evaluate".
        expression: The expression, such as "25 * 4".
    """
    await trio.sleep(0.2)  # the network and the service
    return evaluate(expression)


def agent_factory(model: Model) -> AgentFactory:
    def make(request: RunRequest) -> Agent:
        run_model = ScriptedModel(pace=model.pace) if isinstance(model, ScriptedModel) else model
        return Agent(run_model, tools=[remote_calculator])

    return make


def describe(event: FlowEvent) -> str | None:
    """One line for the events worth showing (tokens are counted, not shown)."""
    data = event.data
    if event.type == "flow.started":
        return "flow.started"
    if event.type == "tool.started":
        return f"tool.started: {data['tool']} {dict(data['input'])}"
    if event.type == "tool.completed":
        return f"tool.completed: {data['result']}"
    if event.type == "flow.completed":
        return f"flow.completed: {data['output']!r}"
    if event.type == "flow.failed":
        return f"flow.failed: {data['error']['message']}"
    if event.type == "flow.cancelled":
        return f"flow.cancelled: reason {data['reason']!r}"
    return None


async def main(pace: float) -> None:
    async with open_model(pace=pace) as model:
        app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
            )
            ws_url = urls[0].replace("http://", "ws://", 1) + "/ws"
            print(f"server on {urls[0]} (model: {model.name}); connecting to {ws_url}")

            async with ws_connect(ws_url) as conn:
                first = await conn.start("What is 25 * 4?")
                second = await conn.start("What is 2 ^ 10?")
                labels = {first: "run 1", second: "run 2"}
                print(f"run 1 started: {first}")
                print(f"run 2 started: {second} (to be cancelled when its tool call starts)")

                tokens = dict.fromkeys(labels, 0)
                terminal: dict[str, str] = {}
                async for event in conn:
                    run_id = event.run_id or ""
                    if event.type == "token.received":
                        tokens[run_id] += 1
                        continue
                    line = describe(event)
                    if line is not None:
                        print(f"  [{labels[run_id]} seq {event.seq:>2}] {line}")
                    if run_id == second and event.type == "tool.started":
                        print(f"  cancelling {labels[run_id]} over the same connection")
                        await conn.cancel(second)
                    if event.is_terminal():
                        terminal[run_id] = line or event.type
                        if len(terminal) == len(labels):
                            break

            print("Summary, by run:")
            for run_id, label in labels.items():
                print(f"  {label} ({run_id}): {tokens[run_id]} tokens, {terminal[run_id]}")
            stop.set()
        print("server stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Two runs over one WebSocket; cancel one.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
