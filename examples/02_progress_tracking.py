"""Tutorial 2: a progress bar with duration and ETA, and subscription statistics.

Shows how to follow a run's progress and how to see whether its consumers
keep up:

* the run is started in the background with ``executor.start(...)``, which
  returns a :class:`trioflow.Run` handle;
* a *viewer* subscribes to it and draws a progress bar from each
  ``progress.update`` event (percent, duration, ETA);
* a *dashboard* that refreshes only four times a second subscribes with a
  small buffer and the ``DROP_OLDEST`` overflow policy: when it falls behind
  it keeps the newest events and counts what it dropped;
* ``statistics()`` reports each subscription's size, capacity, utilisation
  and dropped events, during the run and at its end.

Run it::

    python examples/02_progress_tracking.py
    python examples/02_progress_tracking.py --pace 0     # the dashboard drops more

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import trio

from trioflow import Agent, Overflow, StreamingFlowExecutor, Subscription
from trioflow.builtin import calculator
from trioflow.models import open_model
from trioflow.progress import format_duration

BAR_WIDTH = 30


def progress_bar(figures: Mapping[str, Any], *, done: bool = False) -> str:
    """One line: the bar, percent, iteration, duration and ETA of a ``progress.update``."""
    percent = figures["progress_percent"]  # 100 once the run has answered
    filled = round(percent / 100 * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    line = f"[{bar}] {percent:5.1f}%  {figures['formatted_duration']} elapsed"
    if done:
        return line + "  done"
    eta = figures["estimated_remaining"]
    eta_text = "unknown" if eta is None else format_duration(eta)
    return (
        line
        + f"  iteration {figures['current_iteration']}/{figures['total_iterations']}"
        + f"  ETA {eta_text}"
    )


def show_statistics(*subscriptions: Subscription) -> None:
    for sub in subscriptions:
        s = sub.statistics()
        print(
            f"    {s.name:<10} size {s.size:>3}/{s.capacity:<4} "
            f"utilisation {s.utilization:5.1f}%  dropped {s.dropped:>3}  "
            f"delivered {s.delivered:>3}  ({s.overflow.value})"
        )


async def dashboard(events: Subscription) -> None:
    """Refresh four times a second with whatever is newest; a slow consumer on purpose."""
    while True:
        try:
            await events.receive_batch()  # every ready event in one step
        except trio.EndOfChannel:  # the run is over and the buffer is drained
            return
        await trio.sleep(0.25)


async def main(task: str, pace: float) -> None:
    async with open_model(pace=pace) as model:
        agent = Agent(model, tools=[calculator], max_iterations=4)
        print(f"Task: {task}  (model: {model.name}, at most {agent.max_iterations} iterations)")

        async with StreamingFlowExecutor() as executor:
            run = await executor.start(agent, task, timeout=60)
            async with (
                run.subscribe(name="viewer") as viewer,
                run.subscribe(name="dashboard", buffer=8, overflow=Overflow.DROP_OLDEST) as slow,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(dashboard, slow)
                async for event in viewer:
                    if event.type == "progress.update":
                        print(progress_bar(event.data))
                        show_statistics(viewer, slow)
                    elif event.type == "flow.completed":
                        print(progress_bar(run.progress.to_dict(), done=True))
                        print(f"Answer: {event.data['output']}")
                    elif event.is_terminal():
                        print(f"{event.type}: {dict(event.data)}")
                # The viewer has every event; the dashboard drains its buffer, then ends.

            print("Subscription statistics at the end of the run:")
            show_statistics(viewer, slow)
            bus = run.bus.statistics()
            print(f"    the run emitted {bus.emitted} events; {bus.dropped} were dropped in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A progress bar and subscription statistics.")
    parser.add_argument("task", nargs="?", default="What is 25 * 4?")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.task, args.pace)
