"""A long-running supervisor: many flows at once, a capacity limit, a graceful shutdown.

The shape of a worker process: a loop that keeps starting flows (here from
a list of tasks, in turn), with a :class:`trio.CapacityLimiter` so that at
most ``--concurrency`` run at any moment, each started through an open
:class:`trioflow.StreamingFlowExecutor` and followed by a task of the
supervisor's nursery that prints its completion.

Ctrl-C (or SIGTERM) shuts it down gracefully: no new flow starts, every
running flow is cancelled through its :class:`trioflow.Run` handle and ends
with ``flow.cancelled``, and the supervisor prints its totals and exits.
With ``--runs N`` it stops by itself after N flows have finished.

Run it::

    python examples/supervisor.py                   # until Ctrl-C
    python examples/supervisor.py --runs 20 --concurrency 3 --pace 0

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import signal

import trio

from trioflow import Agent, Run, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.models import Model, open_model

TASKS = [
    "What is 25 * 4?",
    "What is 2 ^ 10?",
    "Tell me about trioflow.",
    "What is (3 + 4) * 2?",
    "Use the calculator to compute 1 / 0.",
]

SHUTDOWN_REASON = "supervisor shutting down"


class Supervisor:
    """Starts flows within a capacity limit, follows them, and cancels them on shutdown."""

    def __init__(self, executor: StreamingFlowExecutor, model: Model, concurrency: int) -> None:
        self.executor = executor
        self.model = model
        self.limiter = trio.CapacityLimiter(concurrency)
        self.active: dict[str, Run] = {}
        self.peak = 0
        self.started = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.stopping = False

    async def submit_forever(self, nursery: trio.Nursery, max_runs: int | None) -> None:
        """Start flows one after another, each when a slot is free, until stopped."""
        for number in itertools.count(1):
            if max_runs is not None and number > max_runs:
                return
            slot = object()  # the borrower of one unit of capacity, released by the flow's task
            await self.limiter.acquire_on_behalf_of(slot)
            if self.stopping:
                self.limiter.release_on_behalf_of(slot)
                return
            task = TASKS[(number - 1) % len(TASKS)]
            run = await self.executor.start(Agent(self.model, tools=[calculator]), task)
            self.started += 1
            self.active[run.run_id] = run
            self.peak = max(self.peak, len(self.active))
            nursery.start_soon(self.follow, number, run, slot)

    async def follow(self, number: int, run: Run, slot: object) -> None:
        """Wait for one flow to end, print how it ended, free its slot."""
        try:
            result = await run.wait()
        finally:
            del self.active[run.run_id]
            self.limiter.release_on_behalf_of(slot)
        self.outcomes[str(result.status)] += 1
        output = result.output if len(result.output) <= 40 else result.output[:37] + "..."
        detail = repr(output) if result.status == "completed" else ""
        if result.status == "cancelled":
            detail = f"flow.cancelled: reason {result.reason!r}"
        elif result.status == "failed" and result.error is not None:
            detail = f"{result.error['type']}: {result.error['message']}"
        print(
            f"run {number:>3} {result.status:<9} in {result.duration:5.2f} s  "
            f"(active {len(self.active)}/{int(self.limiter.total_tokens)})  {detail}"
        )

    def shutdown(self) -> None:
        """Start no new flow; cancel the running ones (each ends with flow.cancelled)."""
        self.stopping = True
        print(f"shutting down: cancelling {len(self.active)} running flow(s)")
        for run in list(self.active.values()):
            run.cancel(SHUTDOWN_REASON)


async def main(args: argparse.Namespace) -> None:
    async with open_model(pace=args.pace) as model, StreamingFlowExecutor() as executor:
        supervisor = Supervisor(executor, model, args.concurrency)
        limit = f"{args.runs} runs" if args.runs is not None else "Ctrl-C"
        print(
            f"supervisor: at most {args.concurrency} flows at once, until {limit} "
            f"(model: {model.name})"
        )
        async with trio.open_nursery() as outer:

            async def watch_signals(submitting: trio.CancelScope) -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        submitting.cancel()
                        supervisor.shutdown()
                        return

            async with trio.open_nursery() as flows:
                with trio.CancelScope() as submitting:
                    outer.start_soon(watch_signals, submitting)
                    await supervisor.submit_forever(flows, args.runs)
                # Submitting is over (N runs started, or a signal): the flows finish.
            outer.cancel_scope.cancel()  # stop watching signals

        totals = ", ".join(f"{n} {status}" for status, n in sorted(supervisor.outcomes.items()))
        print(f"supervisor stopped: {supervisor.started} flows started; {totals}")
        print(f"peak concurrency: {supervisor.peak} (limit {args.concurrency})")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run many flows concurrently, within a limit.")
    parser.add_argument("--runs", type=positive_int, help="exit after this many flows")
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, help="flows at once (default 4)"
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    trio.run(main, parser.parse_args())
