"""AG-UI: drive trioflow as an AG-UI agent, the way ``@ag-ui/client``'s ``HttpAgent`` does.

A server starts in this process on a free port, then, over plain HTTP:

1. ``POST /agui`` with an AG-UI ``RunAgentInput`` (``threadId``, ``runId``,
   ``messages``, ...): the answer is the run's AG-UI event stream
   (``RUN_STARTED``, ``TEXT_MESSAGE_*``, ``TOOL_CALL_*``, ``STEP_*``,
   ``CUSTOM``, ``RUN_FINISHED``), printed one event a line;
2. the next turn of the conversation: the client sends the whole
   conversation again (AG-UI clients keep it), with the assistant's message,
   its tool call and the tool's result; the model sees every turn;
3. a dropped connection resumed: ``GET /runs/{id}/events.agui`` read up to an
   ``id:``, then again with ``Last-Event-ID``: the rest, no gap and no duplicate.

Run it::

    python examples/09_agui.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second. The JavaScript side, with the real ``HttpAgent``, is in
:doc:`/howto/agui` (``docs/howto/agui.rst``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any

import httpx
import trio

from trioflow import Agent, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.models import Model, ScriptedModel, open_model
from trioflow.web import AgentFactory, RunRequest, WebConfig, create_app, serve


def agent_factory(model: Model) -> AgentFactory:
    """One agent per run; the scripted model keeps per-run state, so each run gets its own."""

    def make(request: RunRequest) -> Agent:
        run_model = ScriptedModel(pace=model.pace) if isinstance(model, ScriptedModel) else model
        return Agent(run_model, tools=[calculator])

    return make


def show(event: dict[str, Any]) -> str:
    """One AG-UI event, in a line."""
    kind = event["type"]
    if kind == "TEXT_MESSAGE_CONTENT":
        return f"{kind} {event['delta']!r}"
    if kind in ("RUN_STARTED", "RUN_FINISHED"):
        more = f" result={event['result']!r}" if "result" in event else ""
        return f"{kind} threadId={event['threadId']} runId={event['runId']}{more}"
    if kind in ("STEP_STARTED", "STEP_FINISHED"):
        return f"{kind} {event['stepName']!r}"
    if kind == "TOOL_CALL_START":
        return f"{kind} {event['toolCallName']} ({event['toolCallId']})"
    if kind == "TOOL_CALL_ARGS":
        return f"{kind} {event['delta']}"
    if kind == "TOOL_CALL_RESULT":
        return f"{kind} {event['content']!r}"
    if kind == "CUSTOM":
        return f"{kind} {event['name']}"
    return kind


def data_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def agui_turn(
    http: httpx.AsyncClient, base: str, body: dict[str, Any]
) -> list[dict[str, Any]]:
    """``POST /agui``; print each AG-UI event as it arrives; return them."""
    events: list[dict[str, Any]] = []
    async with http.stream("POST", f"{base}/agui", json=body) as response:
        response.raise_for_status()
        print(f"POST /agui -> {response.status_code} {response.headers['content-type']}")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                print(f"  {show(events[-1])}")
    return events


def assistant_messages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What an AG-UI client makes of the events: the assistant's messages and the tool results."""
    messages: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event["type"]
        if kind == "TEXT_MESSAGE_START":
            by_id[event["messageId"]] = {
                "id": event["messageId"],
                "role": "assistant",
                "content": "",
            }
            messages.append(by_id[event["messageId"]])
        elif kind == "TEXT_MESSAGE_CONTENT":
            by_id[event["messageId"]]["content"] += event["delta"]
        elif kind == "TOOL_CALL_START":
            call = {"id": event["toolCallId"], "type": "function"}
            call["function"] = {"name": event["toolCallName"], "arguments": ""}
            by_id[event["parentMessageId"]].setdefault("toolCalls", []).append(call)
            by_id[event["toolCallId"]] = call
        elif kind == "TOOL_CALL_ARGS":
            by_id[event["toolCallId"]]["function"]["arguments"] += event["delta"]
        elif kind == "TOOL_CALL_RESULT":
            messages.append(
                {
                    "id": event["messageId"],
                    "role": "tool",
                    "toolCallId": event["toolCallId"],
                    "content": event["content"],
                }
            )
    return messages


async def main(pace: float) -> None:
    async with open_model(pace=pace) as model:
        app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
            )
            base = urls[0]
            print(f"server listening on {base} (model: {model.name})")
            async with httpx.AsyncClient(timeout=30) as http:
                print("\n1. A run from a RunAgentInput:")
                conversation: list[dict[str, Any]] = [
                    {"id": "user-1", "role": "user", "content": "What is 25 * 4?"}
                ]
                body = {
                    "threadId": "thread-1",
                    "runId": "agui-run-1",
                    "state": {},
                    "messages": conversation,
                    "tools": [],
                    "context": [],
                    "forwardedProps": {},
                }
                first = await agui_turn(http, base, body)
                run_id = first[0]["metadata"]["trioflow"]["runId"]
                print(f"  (trioflow's run id: {run_id})")

                print("\n2. The next turn, with the conversation so far:")
                conversation += assistant_messages(first)
                conversation.append({"id": "user-2", "role": "user", "content": "What is 7 * 6?"})
                roles = ", ".join(m["role"] for m in conversation)
                print(f"  messages sent: {roles}")
                await agui_turn(
                    http, base, body | {"runId": "agui-run-2", "messages": conversation}
                )

                print("\n3. A dropped connection, resumed with Last-Event-ID:")
                path = f"{base}/runs/{run_id}/events.agui"
                whole = (await http.get(path)).text
                cut = whole.index("\n\n", whole.index("TOOL_CALL_END")) + 2
                dropped = whole[:cut]  # what arrived before the connection dropped
                last_id = [line for line in dropped.splitlines() if line.startswith("id: ")][-1][4:]
                print(f"  received {len(data_lines(dropped))} events, the last id: {last_id}")
                rest = await http.get(path, headers={"Last-Event-ID": last_id})
                resumed = data_lines(rest.text)
                print(f"  resumed: {len(resumed)} more, from {show(resumed[0])}")
                same = data_lines(dropped) + resumed == data_lines(whole)
                print(f"  no gap, no duplicate: {same}")
            stop.set()
    print("server stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Drive trioflow over AG-UI with plain HTTP.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    trio.run(main, parser.parse_args().pace)
