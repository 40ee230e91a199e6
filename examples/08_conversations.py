"""Tutorial 8: a conversation, a tool call a person approves, and a polite stop.

Three things a chat product needs, in one short program:

1. a **thread**: three messages in one conversation; each run sees the
   turns before it (the thread grows by the user's message, the
   assistant's turns, the tool calls and their results);
2. **tool approvals**: the calculator asks before it runs; a small "person"
   (a task of this program) approves small sums, edits one, and denies the
   big one, whose reason the model reads;
3. **cancel after the turn**: a run asked to stop with
   ``mode="after_turn"`` lets its tool call finish, then ends
   ``flow.cancelled``.

Run it::

    python examples/08_conversations.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import trio

from trioflow import Agent, FlowEvent, Run, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.models import open_model
from trioflow.threads import Thread, Threads

asking_calculator = dataclasses.replace(calculator, requires_approval=True)
"""The demo calculator, but each call waits for a person's decision."""


def person(run: Run, event: FlowEvent) -> None:
    """Decide on a waiting call: small sums go, 99 * 99 becomes 9 * 9, anything with 1000 is denied."""
    call_id, expression = event.data["call_id"], event.data["input"].get("expression", "")
    if "1000" in expression:
        print(f"  person: deny {expression!r} (too big)")
        run.deny(call_id, "sums with 1000 need a manager")
    elif expression == "99 * 99":
        print(f"  person: edit {expression!r} to '9 * 9'")
        run.edit(call_id, {"operation": "evaluate", "expression": "9 * 9"})
    else:
        print(f"  person: approve {expression!r}")
        run.approve(call_id)


async def converse(
    executor: StreamingFlowExecutor, agent: Agent, thread: Thread, message: str
) -> None:
    run = await executor.start(agent, message, thread=thread)
    print(f"> {message}")
    async with run.subscribe(after=0) as events:
        async for event in events:
            if event.type == "tool.approval_required":
                person(run, event)
            elif event.type == "tool.denied":
                print(f"  tool.denied: {event.data['reason']}")
            elif event.type == "flow.completed":
                print(f"  assistant: {event.data['output']}")


async def main(pace: float) -> None:
    threads = Threads()
    async with open_model(pace=pace) as model, StreamingFlowExecutor() as executor:
        agent = Agent(model, tools=[asking_calculator])

        print("1. One conversation, three messages:")
        thread = threads.create({"user": "ann"})
        for message in ("What is 25 * 4?", "And what is 1000 + 1?", "Then what is 99 * 99?"):
            await converse(executor, agent, thread, message)
            print(f"  (the thread holds {len(thread.messages)} messages)")
        print(f"  runs of the thread: {len(thread.runs)}")

        print("2. Cancel after the turn:")
        patient = Agent(model, tools=[calculator])
        run = await executor.start(patient, "What is 6 * 7?")
        async with run.subscribe(after=0) as events:
            async for event in events:
                if event.type == "tool.started":
                    run.cancel("the user said stop", mode="after_turn")
                    print("  asked to stop after this turn while the tool runs")
                elif event.type == "tool.completed":
                    print(f"  tool.completed: {event.data['result']}")
                elif event.type == "flow.cancelled":
                    print(f"  flow.cancelled: {event.data['reason']!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Conversations, approvals and cancel modes.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
