"""Production patterns: buffered and conditional streaming, recording and replay, metrics, errors.

Four patterns from :mod:`trioflow.patterns` and :mod:`trioflow.recording`:

1. Buffered streaming: :func:`~trioflow.patterns.coalesce_tokens` turns
   ``token.received`` events into fewer, larger ``token.chunk`` events (at
   least 20 characters, or every 50 ms), for clients that pay per write.
2. Conditional streaming: the ``"essential"`` filter preset
   (:func:`~trioflow.patterns.preset`) subscribes to tokens, tool results,
   errors and the terminal event only.
3. Recording and replay: an :class:`~trioflow.recording.EventRecorder` on a
   bus writes three runs to a JSON-lines file (a temporary one here);
   :func:`~trioflow.recording.replay` plays it back at ``speed=math.inf``.
4. Metrics and errors: a :class:`~trioflow.patterns.MetricsCollector` and an
   :class:`~trioflow.patterns.ErrorTracker` listen on the same bus; the
   collector's figures are computed again from the replay, and agree.

Run it::

    python examples/production_patterns.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import trio

from trioflow import Agent, FlowEvent, Overflow, StreamingFlowExecutor, open_event_bus
from trioflow.builtin import calculator
from trioflow.models import Model, open_model
from trioflow.patterns import ErrorTracker, FlowMetrics, MetricsCollector, coalesce_tokens, preset
from trioflow.recording import EventRecorder, RecordingWarning, replay


async def buffered(model: Model) -> None:
    print("1. Buffered streaming: tokens coalesced into chunks of at least 20 characters")
    executor = StreamingFlowExecutor()
    chunks = tokens = 0
    async with (
        executor.stream(Agent(model), "Tell me about trioflow.") as events,
        coalesce_tokens(events, min_chars=20, interval=0.05) as coalesced,
    ):
        async for event in coalesced:
            if event.type == "token.chunk":
                chunks += 1
                tokens += event.data["tokens"]
                print(f"   token.chunk ({event.data['tokens']:>2} tokens): {event.data['chunk']!r}")
            elif event.is_terminal():
                print(f"   {event.type}")
    print(f"   {tokens} token.received events became {chunks} token.chunk events")


async def conditional(model: Model) -> None:
    essential = preset("essential")
    assert essential is not None
    print(f"2. Conditional streaming: preset 'essential' = {sorted(essential)}")
    executor = StreamingFlowExecutor()
    seen: dict[str, int] = {}
    agent = Agent(model, tools=[calculator])
    async with executor.stream(agent, "What is 25 * 4?", types=essential) as events:
        async for event in events:
            seen[event.type] = seen.get(event.type, 0) + 1
            if event.type == "tool.completed":
                print(f"   tool.completed: {event.data['result']}")
            elif event.is_terminal():
                print(f"   {event.type}: {event.data['output']!r}")
    print(f"   received only: {', '.join(f'{t} x{n}' for t, n in seen.items())}")


def show_metrics(label: str, metrics: FlowMetrics) -> None:
    print(
        f"   {label}: {metrics.runs} runs, {metrics.events} events, {metrics.tokens} tokens, "
        f"{metrics.iterations} iterations, {metrics.tool_calls} tool calls "
        f"({metrics.tool_failures} failed), {metrics.errors} errors"
    )


async def record_and_replay(model: Model, path: Path) -> None:
    print("3. Recording three runs, with metrics and error tracking on the same bus")
    metrics = MetricsCollector()
    errors = ErrorTracker(limit=50)
    with EventRecorder(path) as recorder:
        async with open_event_bus() as bus:
            # BLOCK: listeners that must see every event (the figures are exact).
            bus.add_listener(recorder, overflow=Overflow.BLOCK, name="recorder")
            bus.add_listener(metrics, overflow=Overflow.BLOCK, name="metrics")
            bus.add_listener(errors, types=FlowEvent.is_error, name="errors")
            executor = StreamingFlowExecutor(bus=bus)
            runs = [
                (Agent(model, tools=[calculator]), "What is 25 * 4?"),
                (Agent(model, tools=[calculator]), "Use the calculator to compute 1 / 0."),
                (Agent(model, tools=[calculator], max_iterations=1), "What is 2 ^ 10?"),
            ]
            for agent, task in runs:
                result = await executor.run(agent, task, timeout=60)
                print(f"   {task!r} -> {result.status}")
        # The bus is closed: its listeners have drained.
        print(f"   recorded {recorder.count} events to {path.name}")

    print("4. Metrics and errors")
    show_metrics("live", metrics.result())
    for run_id, figures in metrics.by_run().items():
        print(f"   {run_id}: {figures.status}, {figures.tokens} tokens, {figures.duration:.3f} s")
    summary = errors.summary()
    print(f"   errors: {summary.total} in {summary.runs} runs")
    print(f"   by event type: { {str(k): n for k, n in summary.by_event_type.items()} }")
    print(f"   by error type: {dict(summary.by_error_type)}")

    print("   replaying the recording at speed=inf")
    replayed = MetricsCollector()
    terminals = []
    # A recording of a shared bus holds several runs: the replay reports each
    # new run id as a RecordingWarning (a one-run recording never has one).
    notes: list[RecordingWarning] = []
    async with replay(path, speed=math.inf, on_warning=notes.append) as events:
        async for event in events:
            replayed(event)
            if event.is_terminal():
                terminals.append(event.type)
    print(f"   replayed terminal events: {', '.join(terminals)}")
    print(f"   runs in the recording: {1 + sum(note.kind == 'run_id' for note in notes)}")
    show_metrics("replay", replayed.result())
    same = replayed.result().events == metrics.result().events
    print(f"   live and replayed figures agree: {same}")


async def main(pace: float) -> None:
    async with open_model(pace=pace) as model:
        await buffered(model)
        await conditional(model)
        with tempfile.TemporaryDirectory() as directory:
            await record_and_replay(model, Path(directory) / "runs.jsonl")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Production patterns.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
