"""Tutorial 1: stream an agent run live, event by event.

Shows the basic loop of trioflow: make a :class:`trioflow.StreamingFlowExecutor`,
open ``executor.stream(agent, task)`` and handle each event as it arrives:
the answer token by token, the calculator tool call and its result, the
progress after each iteration, and the one terminal event that ends every run.

Run it::

    python examples/01_basic_streaming.py
    python examples/01_basic_streaming.py "What is (3 + 4) * 2?" --pace 5

It works offline with the scripted model; with ``ANTHROPIC_API_KEY`` set it
talks to Claude instead. ``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the
scripted model's tokens per second; 0 streams as fast as possible.
"""

from __future__ import annotations

import argparse
import os

import trio

from trioflow import Agent, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.models import open_model


async def main(task: str, pace: float) -> None:
    async with open_model(pace=pace) as model:
        agent = Agent(model, tools=[calculator])
        executor = StreamingFlowExecutor()
        print(f"Task: {task}  (model: {model.name})")

        async with executor.stream(agent, task, timeout=60) as events:
            async for event in events:
                data = event.data
                if event.type == "token.received":
                    print(data["token"], end="", flush=True)  # live, as the model writes
                    continue
                if event.type == "flow.started":
                    print(f"[{event.seq:>2}] flow.started: run {event.run_id}")
                elif event.type == "iteration.started":
                    print(f"[{event.seq:>2}] iteration {data['iteration']} - the model writes:")
                elif event.type == "step.completed" and data["step"] == "model":
                    print()  # the end of the model's text
                elif event.type == "tool.started":
                    print(f"[{event.seq:>2}] tool.started: {data['tool']} {dict(data['input'])}")
                elif event.type == "tool.completed":
                    print(
                        f"[{event.seq:>2}] tool.completed: {data['tool']} returned {data['result']}"
                    )
                elif event.type == "tool.failed":
                    print(f"[{event.seq:>2}] tool.failed: {data['error']['message']}")
                elif event.type == "progress.update":
                    print(
                        f"[{event.seq:>2}] progress: {data['current_iteration']}/"
                        f"{data['total_iterations']} iterations ({data['percent']:.0f}%), "
                        f"{data['formatted_duration']} elapsed"
                    )
                elif event.is_terminal():
                    print(f"[{event.seq:>2}] {event.type}")
                    if event.type == "flow.completed":
                        print(f"Answer: {data['output']}")
                        print(f"Tokens used: {data['usage']['total_tokens']}")
                    else:
                        print(f"Details: {dict(data)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Stream an agent run live.")
    parser.add_argument("task", nargs="?", default="What is 25 * 4?")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.task, args.pace)
