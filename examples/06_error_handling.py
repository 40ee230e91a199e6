"""Tutorial 6: failures, retries, timeouts and cancellation, each with its terminal event.

Every run ends with exactly one terminal event: ``flow.completed``,
``flow.failed`` or ``flow.cancelled``. This example runs six scenarios and
prints, for each, what went wrong, how it was handled and the terminal event
the run ended with:

1. a normal run;
2. a tool error (division by zero): ``tool.failed`` is reported in the
   stream, the model is told, and the run goes on;
3. a flaky tool, a calculator behind an unreliable connection, recovered by
   :func:`trioflow.retry` with a :class:`trioflow.RetryPolicy` (exponential
   backoff; the delays are shown);
4. a timeout: a tool that hangs, and the run's time limit that ends it;
5. a cancellation through the run's :class:`trioflow.Run` handle while the
   model is writing;
6. a run that runs out of iterations and fails.

Run it::

    python examples/06_error_handling.py

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

from trioflow import (
    Agent,
    FlowEvent,
    RetryAttempt,
    RetryPolicy,
    StreamingFlowExecutor,
    Tool,
    retry,
    tool,
)
from trioflow.builtin import calculator, evaluate
from trioflow.models import open_model


def outcome(event: FlowEvent) -> str:
    """The terminal event and what matters in it."""
    data = event.data
    if event.type == "flow.completed":
        return f"=> flow.completed: {data['output']!r}"
    if event.type == "flow.failed":
        return f"=> flow.failed: {data['error']['type']}: {data['error']['message']}"
    return f"=> flow.cancelled: reason {data['reason']!r} after {data['duration']:.2f} s"


async def stream(agent: Agent, task: str, *, time_limit: float | None = None) -> None:
    """Run ``agent`` on ``task``, printing the events that tell the story."""
    async with StreamingFlowExecutor().stream(agent, task, timeout=time_limit) as events:
        async for event in events:
            if event.type == "tool.started":
                print(f"   tool.started: {event.data['tool']} {dict(event.data['input'])}")
            elif event.type == "tool.completed":
                print(f"   tool.completed: {event.data['result']}")
            elif event.type == "tool.failed":
                print(f"   tool.failed: {event.data['error']['message']} (the run goes on)")
            elif event.is_terminal():
                print(f"   {outcome(event)}")


# -- 3. a flaky tool, recovered by retry --------------------------------------


class FlakyConnection:
    """Stands in for a remote calculation service whose first calls fail."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def evaluate(self, expression: str) -> int | float:
        self.calls += 1
        await trio.sleep(0.01)  # the network
        if self.calls <= self.failures:
            raise ConnectionError(f"connection reset by peer (call {self.calls})")
        return evaluate(expression)


def remote_calculator(connection: FlakyConnection, policy: RetryPolicy) -> Tool:
    def report(attempt: RetryAttempt) -> None:
        print(
            f"   attempt {attempt.attempt} failed: {attempt.error}; "
            f"backing off {attempt.delay:.2f} s"
        )

    @tool(name="calculator")
    async def remote_calculate(operation: Literal["evaluate"], expression: str) -> int | float:
        """Evaluate an arithmetic expression on the remote calculation service.

        Args:
            operation: Always "evaluate".
            expression: The expression, such as "25 * 4".
        """
        call = functools.partial(connection.evaluate, expression)
        return await retry(call, policy, on_retry=report)

    return remote_calculate


# -- 4. a tool that hangs -----------------------------------------------------


@tool(name="calculator")
async def hanging_calculator(operation: Literal["evaluate"], expression: str) -> int | float:
    """Evaluate an arithmetic expression on a service that never answers.

    Args:
        operation: Always "evaluate".
        expression: The expression, such as "25 * 4".
    """
    await trio.sleep_forever()
    raise AssertionError("unreachable")


# -- 5. cancelling a run through its handle -----------------------------------


async def cancel_while_writing(agent: Agent, task: str, after_tokens: int) -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(agent, task)
        tokens = 0
        async with run.subscribe() as events:
            async for event in events:
                if event.type == "token.received":
                    tokens += 1
                    if tokens == after_tokens:
                        print(f"   {tokens} tokens in: cancelling the run")
                        run.cancel("user pressed stop")
                elif event.is_terminal():
                    print(f"   {outcome(event)}")
        result = await run.wait()
        print(f"   run.result: status {result.status}, partial output {result.output!r}")


async def main(pace: float) -> None:
    task = "Use the calculator to compute 25 * 4."
    async with open_model(pace=pace) as model:
        print("1. A normal run")
        await stream(Agent(model, tools=[calculator]), task)

        print("2. A tool error: division by zero")
        await stream(Agent(model, tools=[calculator]), "Use the calculator to compute 1 / 0.")

        print("3. A flaky tool, retried with exponential backoff")
        policy = RetryPolicy(attempts=4, base_delay=0.1, jitter=0.0, retry_on=(ConnectionError,))
        planned = ", ".join(f"{policy.delay(n):.2f} s" for n in range(1, policy.attempts))
        print(f"   policy: {policy.attempts} attempts, backoff delays {planned}")
        connection = FlakyConnection(failures=2)
        await stream(Agent(model, tools=[remote_calculator(connection, policy)]), task)
        print(f"   the service was called {connection.calls} times")

        print("4. A timeout: the tool hangs, the run's time limit is 0.5 s")
        await stream(Agent(model, tools=[hanging_calculator]), task, time_limit=0.5)

        print("5. A cancellation while the model is writing")
        await cancel_while_writing(Agent(model), "Tell me about trioflow.", after_tokens=3)

        print("6. Out of iterations: one model turn allowed, the tool call needs two")
        await stream(Agent(model, tools=[calculator], max_iterations=1), task)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Failures, retries, timeouts, cancellation.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
