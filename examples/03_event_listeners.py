"""Tutorial 3: callback listeners on a shared event bus.

Shows how several consumers watch the same runs at once, each in a task of
its own so that none can slow down or crash the others:

* four listeners on one bus, added with ``bus.add_listener``: a token
  counter, a performance monitor, an error tracker and an event logger;
* the executor re-emits every event of every run on that bus
  (``StreamingFlowExecutor(bus=bus)``);
* the event logger subscribes *while* run 1 is going and is unsubscribed
  (``bus.remove_listener``) during run 2, right after its tool call failed;
* a custom named event: ``bus.register_event("on_run_summary",
  "app.run_summary", callback)`` and ``bus.emit_named("on_run_summary", ...)``.

Run it::

    python examples/03_event_listeners.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import trio

from trioflow import Agent, FlowEvent, StreamingFlowExecutor, open_event_bus
from trioflow.builtin import calculator
from trioflow.models import open_model
from trioflow.progress import format_duration

TIMED_TYPES = {"step.completed", "tool.completed", "tool.failed"}


class TokenCounter:
    """Counts the tokens streamed, per run."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = defaultdict(int)

    def __call__(self, event: FlowEvent) -> None:  # a plain function works as a listener
        self.tokens[event.run_id or "?"] += 1


class PerformanceMonitor:
    """Collects the duration of every model step, tool call and run."""

    def __init__(self) -> None:
        self.durations: dict[str, list[float]] = defaultdict(list)

    def __call__(self, event: FlowEvent) -> None:
        if event.type == "step.completed" and event.data["step"] == "model":
            self.durations["model turn"].append(event.data["duration"])
        elif event.is_tool_event() and event.type != "tool.started":
            self.durations["tool call"].append(event.data["duration"])
        elif event.is_terminal():
            self.durations["run"].append(event.data["duration"])


class ErrorTracker:
    """Remembers every failure and warning."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __call__(self, event: FlowEvent) -> None:
        error = event.data.get("error") or {}
        message = error.get("message") or event.data.get("message", "")
        self.problems.append(f"{event.type} in {event.run_id}: {message}")


async def event_logger(event: FlowEvent) -> None:  # async listeners work too
    print(f"  [log] #{event.seq:<3} {event.run_id or '-':<18} {event.type}")


async def show_summary(event: FlowEvent) -> None:
    data = event.data
    print(f"  [app.run_summary] {data['run_id']}: {data['status']}, {data['output']!r}")


async def main(pace: float) -> None:
    counter, monitor, tracker = TokenCounter(), PerformanceMonitor(), ErrorTracker()

    async with open_model(pace=pace) as model:
        agent = Agent(model, tools=[calculator])
        async with open_event_bus(name="app") as bus:
            bus.add_listener(counter, types={"token.received"}, name="token-counter")
            bus.add_listener(
                monitor,
                types=lambda e: e.type in TIMED_TYPES or e.is_terminal(),
                name="performance-monitor",
            )
            bus.add_listener(
                tracker, types=lambda e: e.is_error() or e.type == "warning", name="error-tracker"
            )
            bus.register_event("on_run_summary", "app.run_summary", callback=show_summary)

            async with StreamingFlowExecutor(bus=bus) as executor:
                print("Run 1: What is 25 * 4?")
                run = await executor.start(agent, "What is 25 * 4?")
                logger_id = bus.add_listener(
                    event_logger, types=lambda e: not e.is_token(), name="event-logger"
                )
                print("+ event-logger subscribed while run 1 is going")
                result = await run.wait()
                await bus.emit_named("on_run_summary", result.to_dict())

                print("Run 2: Use the calculator to compute 1 / 0.")
                run = await executor.start(agent, "Use the calculator to compute 1 / 0.")
                failed_or_over = lambda e: e.type == "tool.failed" or e.is_terminal()  # noqa: E731
                async with run.subscribe(types=failed_or_over) as events:
                    event = await events.receive()
                bus.remove_listener(logger_id)
                print(f"- event-logger unsubscribed during run 2, after {event.type}")
                result = await run.wait()
                await bus.emit_named("on_run_summary", result.to_dict())
        # The bus is closed: every listener has handled all of its events.

    print("Listener report:")
    for run_id, tokens in counter.tokens.items():
        print(f"  token-counter: {run_id} streamed {tokens} tokens")
    for what, durations in monitor.durations.items():
        average = format_duration(sum(durations) / len(durations))
        print(f"  performance-monitor: {len(durations)} x {what}, {average} on average")
    print(f"  error-tracker: {len(tracker.problems)} problem(s)")
    for problem in tracker.problems:
        print(f"    {problem}")
    for listener in bus.statistics().listeners:
        print(
            f"  {listener.name}: {listener.calls} calls, {listener.crashes} crashes, "
            f"dropped {listener.subscription.dropped}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Callback listeners on a shared event bus.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
