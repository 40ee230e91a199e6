"""RunFigures: the one reading of a run's events, and the readers that agree on it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from trioflow import (
    Agent,
    FlowEvent,
    ModelError,
    Overflow,
    ScriptedModel,
    ToolCall,
    Turn,
    open_event_bus,
    open_executor,
)
from trioflow.builtin import calculator
from trioflow.figures import COUNT_KEYS, RunFigures, iteration_usage, measured_duration
from trioflow.models import ModelEvent, RetryNotice, TextDelta
from trioflow.patterns import MetricsCollector
from trioflow.telemetry import Telemetry

# -- RunFigures on its own ------------------------------------------------------------------


def fed(*events: tuple[str, Mapping[str, Any]]) -> RunFigures:
    figures = RunFigures()
    for type, data in events:
        figures.observe(type, data)
    return figures


def test_nothing_observed_is_all_zeros() -> None:
    figures = RunFigures()
    assert figures.counts() == dict.fromkeys(COUNT_KEYS, 0)
    assert list(figures.counts()) == list(COUNT_KEYS)
    assert figures.status is None and figures.measured is None
    assert figures.duration == 0.0 and figures.time_to_first_token is None


def test_tokens_count_every_delta_voided_ones_included() -> None:
    figures = fed(
        ("token.received", {"token": "Hel", "iteration": 1}),
        ("token.received", {"token": "lo", "iteration": 1}),
        ("warning", {"message": "retry", "attempt": 1, "discarded_tokens": 2}),
        ("token.received", {"token": "Hi", "iteration": 1}),
        ("token.chunk", {"chunk": "abcd", "tokens": 3}),
        ("token.received", {"iteration": 1}),  # no text: a token all the same
    )
    assert figures.tokens == 1 + 1 + 1 + 3 + 1
    assert figures.characters == 3 + 2 + 2 + 4
    assert figures.discarded_tokens == 2
    assert figures.warnings == 1
    assert figures.events == 6


def test_errors_are_error_and_every_failed_type() -> None:
    figures = fed(
        ("tool.started", {"tool": "calc", "call_id": "a"}),
        ("tool.started", {"tool": "calc", "call_id": "b"}),
        ("tool.started", {"tool": "search", "call_id": "c"}),
        ("tool.failed", {"tool": "calc", "call_id": "b", "error": {"type": "E"}}),
        ("iteration.failed", {"iteration": 1, "error": {"type": "E"}}),
        ("error", {"error": "boom"}),
        ("trade.failed", {}),  # a custom *.failed type is an error too
        ("flow.failed", {"error": {"type": "E"}, "duration": 2.5, "iterations": 1}),
    )
    assert (figures.tool_calls, figures.tool_failures) == (3, 1)
    assert figures.tools == {"calc": 2, "search": 1}
    assert figures.errors == 5
    assert figures.status == "failed"
    assert figures.duration == figures.measured == 2.5
    for type in ("tool.failed", "iteration.failed", "error", "trade.failed", "flow.failed"):
        assert FlowEvent.create(type, {}).is_error()  # the same rule as FlowEvent.is_error


def test_iterations_and_usage_come_from_iteration_completed() -> None:
    figures = fed(
        (
            "iteration.completed",
            {"iteration": 1, "usage": {"input_tokens": 10, "output_tokens": 4}},
        ),
        ("iteration.completed", {"iteration": 2, "usage": {"input_tokens": 7, "output_tokens": 1}}),
        ("iteration.completed", {"iteration": 3, "usage": "nonsense"}),
        ("iteration.failed", {"iteration": 4, "usage": {"input_tokens": 99}}),  # not a schema key
        ("iteration.started", {"iteration": 5}),
    )
    assert figures.iterations == 3
    assert (figures.input_tokens, figures.output_tokens) == (17, 5)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 3, "output_tokens": 2}, (3, 2)),
        ({"input_tokens": True, "output_tokens": -1}, (0, 0)),
        ({"input_tokens": 2.0}, (0, 0)),
        (None, (0, 0)),
    ],
)
def test_iteration_usage(usage: Any, expected: tuple[int, int]) -> None:
    assert iteration_usage({"usage": usage}) == expected


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (1.5, 1.5),
        (0, 0.0),
        (-1.0, None),
        (math.nan, None),
        (math.inf, None),
        (True, None),
        ("1", None),
    ],
)
def test_measured_duration(duration: Any, expected: float | None) -> None:
    assert measured_duration({"duration": duration}) == expected


def test_observe_event_keeps_the_timestamps() -> None:
    figures = RunFigures()
    figures.observe_event(FlowEvent("info", {}, 99.0))
    figures.observe_event(FlowEvent("flow.started", {}, 100.0))
    figures.observe_event(FlowEvent("token.received", {"token": "a"}, 100.5))
    figures.observe_event(FlowEvent("token.received", {"token": "b"}, 101.0))
    assert figures.time_to_first_token == 0.5
    assert figures.duration == 1.0  # while it runs: to the latest event
    figures.observe_event(FlowEvent("flow.cancelled", {"reason": "x"}, 103.0))
    assert figures.status == "cancelled"
    assert figures.duration == 3.0  # no measured duration: by the timestamps
    assert (figures.runs, figures.events, figures.tokens) == (1, 5, 2)


# -- the readers agree ----------------------------------------------------------------------


class VoidingModel(ScriptedModel):
    """A ScriptedModel whose retried turns stream a delta before the retry notice.

    That delta is void: the agent's ``warning`` says ``discarded_tokens: 1``.
    """

    def _plan(
        self, turn: Turn, messages: tuple[Any, ...], system: str | None
    ) -> tuple[list[ModelEvent], BaseException | None]:
        events, failure = super()._plan(turn, messages, system)
        if turn.retries:
            events.insert(0, TextDelta("void "))
        return events, failure


def script() -> list[Turn]:
    notice = RetryNotice(
        attempt=1, delay=0.25, error="Overloaded", kind="overloaded", restarted=True
    )
    return [
        Turn(
            "Let me compute.",
            tool_calls=[
                ToolCall("call_ok", "calculator", {"operation": "add", "a": 2, "b": 3}),
                ToolCall("call_bad", "calculator", {"operation": "divide", "a": 1, "b": 0}),
            ],
        ),
        Turn("The sum is 5; the division failed.", retries=[notice]),
    ]


def failing_script() -> list[Turn]:
    return [
        Turn(tool_calls=[("calculator", {"operation": "divide", "a": 1, "b": 0})]),
        Turn("cut", fail=ModelError("overloaded", kind="overloaded"), fail_after=1),
    ]


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


async def run_all(
    scripts: Sequence[list[Turn]], telemetry: Telemetry, metrics: MetricsCollector
) -> tuple[list[Any], list[FlowEvent]]:
    events: list[FlowEvent] = []
    runs = []
    async with open_event_bus() as bus:
        telemetry.attach(bus)
        bus.add_listener(metrics, overflow=Overflow.BLOCK)
        bus.add_listener(events.append, overflow=Overflow.BLOCK)
        async with open_executor(bus=bus) as executor:
            for turns in scripts:
                run = await executor.start(Agent(VoidingModel(turns), tools=[calculator]), "go")
                await run.wait()
                runs.append(run)
    return runs, events


async def test_executor_metrics_and_telemetry_agree_on_the_same_runs(
    autojump_clock: Any,
) -> None:
    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(
        meter_provider=MeterProvider(metric_readers=[reader]), tracer_provider=tracer_provider
    )
    metrics = MetricsCollector()
    (ok, failed), events = await run_all([script(), failing_script()], telemetry, metrics)
    assert (str(ok.status), str(failed.status)) == ("completed", "failed")

    for run in (ok, failed):
        # The executor's counts, the collector's, and a RunFigures fed the recorded events.
        recorded = RunFigures()
        for event in events:
            if event.run_id == run.run_id:
                recorded.observe_event(event)
        mine = metrics.result(run.run_id)
        assert run.counts() == recorded.counts() == {k: getattr(mine, k) for k in COUNT_KEYS}
        assert run.to_dict()["counts"] == run.counts()
        assert run.counts()["events"] == run.last_seq
        assert (mine.input_tokens, mine.output_tokens) == (
            recorded.input_tokens,
            recorded.output_tokens,
        )
        assert run.figures.duration == recorded.duration == mine.duration
        assert run.result is not None and mine.duration == run.result.duration
        assert run.figures.discarded_tokens == recorded.discarded_tokens

    # The completed run: two tool calls, one failed, a retried turn whose voided token counts.
    counts = ok.counts()
    assert (counts["tool_calls"], counts["tool_failures"], counts["errors"]) == (2, 1, 1)
    assert counts["iterations"] == 2 and counts["warnings"] == 1
    assert ok.figures.discarded_tokens == 1
    tokens = [e for e in events if e.run_id == ok.run_id and e.type == "token.received"]
    assert counts["tokens"] == len(tokens)
    assert ok.result is not None and "void" not in ok.result.output
    # The failed run: tool.failed, iteration.failed and flow.failed are its errors.
    assert failed.counts()["errors"] == 3
    assert failed.counts()["tool_failures"] == 1

    # Telemetry reads the same figures: per run in its spans, in total in its metrics.
    spans = {
        span.attributes["trioflow.run_id"]: span
        for span in exporter.get_finished_spans()
        if span.name == "trioflow.run" and span.attributes is not None
    }
    for run in (ok, failed):
        attributes = spans[run.run_id].attributes
        assert attributes is not None
        assert attributes["trioflow.tokens"] == run.counts()["tokens"]
        assert attributes["trioflow.iterations"] == run.counts()["iterations"]
    total = metrics.result()
    m = points(reader)
    assert m["trioflow.tokens"][0].value == total.tokens
    assert sum(p.sum for p in m["trioflow.iteration.tokens"]) == total.tokens
    usage = {dict(p.attributes)["type"]: p.value for p in m["trioflow.usage.tokens"]}
    assert usage == {"input": total.input_tokens, "output": total.output_tokens}
    assert m["trioflow.run.duration"][0].sum == pytest.approx(total.duration)
    outcomes = {dict(p.attributes)["outcome"]: 0 for p in m["trioflow.tool_calls"]}
    for p in m["trioflow.tool_calls"]:
        outcomes[dict(p.attributes)["outcome"]] += p.value
    assert outcomes["failed"] == total.tool_failures == 2
    assert sum(outcomes.values()) == total.tool_calls == 3
