from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client.parser import text_string_to_metric_families

from trioflow import (
    Agent,
    FlowEvent,
    ModelError,
    Overflow,
    RunResult,
    ScriptedModel,
    StreamingFlowExecutor,
    ToolCall,
    Turn,
    open_event_bus,
)
from trioflow.builtin import calculator
from trioflow.models import RetryNotice
from trioflow.telemetry import (
    HANDLED_TYPES,
    PrometheusMetrics,
    Telemetry,
    open_telemetry,
    render_prometheus,
)

# -- harness --------------------------------------------------------------------------------


@dataclasses.dataclass
class Otel:
    reader: InMemoryMetricReader
    exporter: InMemorySpanExporter
    telemetry: Telemetry

    def metrics(self) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
        """Metric name -> {attributes: data point}."""
        data = self.reader.get_metrics_data()
        out: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    points = out.setdefault(m.name, {})
                    for p in m.data.data_points:
                        points[frozenset((p.attributes or {}).items())] = p
        return out

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        spans = list(self.exporter.get_finished_spans())
        if name is None:
            return spans
        return [s for s in spans if s.name == name or s.name.startswith(name + " ")]


def make_otel(**options: Any) -> Otel:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(
        meter_provider=MeterProvider(metric_readers=[reader]),
        tracer_provider=tracer_provider,
        **options,
    )
    return Otel(reader, exporter, telemetry)


def value(points: Mapping[frozenset[tuple[str, Any]], Any], **attributes: Any) -> Any:
    return points[frozenset(attributes.items())].value


async def run_observed(
    telemetry: Telemetry,
    agent: Agent,
    task: str = "What is 25 * 4?",
    **options: Any,
) -> tuple[RunResult, list[FlowEvent]]:
    """Run ``agent`` on an executor whose shared bus the telemetry listens to.

    Returns once the bus is closed, so the listener has handled every event.
    """
    events: list[FlowEvent] = []
    async with open_event_bus() as bus:
        telemetry.attach(bus)
        bus.add_listener(events.append, overflow=Overflow.BLOCK)
        result = await StreamingFlowExecutor(bus=bus).run(agent, task, **options)
    return result, events


def of_type(events: list[FlowEvent], type: str) -> list[FlowEvent]:
    return [e for e in events if e.type == type]


def failing_tool_script() -> list[Turn]:
    return [
        Turn(
            "Let me divide.",
            tool_calls=[
                ToolCall("call_ok", "calculator", {"operation": "add", "a": 2, "b": 3}),
                ToolCall("call_bad", "calculator", {"operation": "divide", "a": 1, "b": 0}),
            ],
        ),
        Turn("One of them failed."),
    ]


# -- metrics ----------------------------------------------------------------------------------


async def test_a_completed_run_records_exact_counts() -> None:
    otel = make_otel()
    result, events = await run_observed(otel.telemetry, Agent(tools=[calculator]))
    assert result.ok
    m = otel.metrics()
    tokens = of_type(events, "token.received")
    assert tokens
    assert value(m["trioflow.tokens"]) == len(tokens)
    assert value(m["trioflow.iterations"]) == len(of_type(events, "iteration.started")) == 2
    assert value(m["trioflow.tool_calls"], tool="calculator", outcome="completed") == 1
    assert value(m["trioflow.runs"], status="completed") == 1
    assert value(m["trioflow.runs.active"]) == 0
    usage = result.usage
    assert value(m["trioflow.usage.tokens"], type="input") == usage.input_tokens
    assert value(m["trioflow.usage.tokens"], type="output") == usage.output_tokens


async def test_histograms_count_iterations_runs_and_first_tokens() -> None:
    otel = make_otel()
    result, events = await run_observed(otel.telemetry, Agent(tools=[calculator]))
    m = otel.metrics()
    per_iteration = m["trioflow.iteration.tokens"][frozenset()]
    assert per_iteration.count == 2
    assert per_iteration.sum == len(of_type(events, "token.received"))
    duration = m["trioflow.run.duration"][frozenset()]
    assert duration.count == 1
    assert duration.sum == pytest.approx(result.duration)
    assert m["trioflow.run.time_to_first_token"][frozenset()].count == 1
    tool_duration = m["trioflow.tool.duration"][
        frozenset({("tool", "calculator"), ("outcome", "completed")})
    ]
    assert tool_duration.count == 1
    assert m["trioflow.model.duration"][frozenset({("model", "scripted")})].count == 2


async def test_tool_calls_are_counted_by_tool_and_outcome() -> None:
    otel = make_otel()
    result, _ = await run_observed(
        otel.telemetry, Agent(ScriptedModel(failing_tool_script()), tools=[calculator])
    )
    assert result.ok
    calls = otel.metrics()["trioflow.tool_calls"]
    assert value(calls, tool="calculator", outcome="completed") == 1
    assert value(calls, tool="calculator", outcome="failed") == 1
    assert len(calls) == 2


async def test_runs_are_counted_by_status(autojump_clock: trio.testing.MockClock) -> None:
    otel = make_otel()
    completed, _ = await run_observed(otel.telemetry, Agent(tools=[calculator]))
    failed, _ = await run_observed(
        otel.telemetry,
        Agent(ScriptedModel([Turn(fail=ModelError("overloaded", kind="overloaded"))])),
    )
    cancelled, _ = await run_observed(
        otel.telemetry, Agent(ScriptedModel(pace=1.0), tools=[calculator]), timeout=0.5
    )
    assert [r.status for r in (completed, failed, cancelled)] == [
        "completed",
        "failed",
        "cancelled",
    ]
    m = otel.metrics()
    runs = m["trioflow.runs"]
    assert {dict(k)["status"]: p.value for k, p in runs.items()} == {
        "completed": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert value(m["trioflow.runs.active"]) == 0
    assert m["trioflow.run.duration"][frozenset()].count == 3


async def test_time_to_first_token_with_a_paced_model_under_MockClock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    otel = make_otel(clock=trio.current_time)
    model = ScriptedModel([Turn("one two three four")], pace=4.0)
    result, _ = await run_observed(otel.telemetry, Agent(model))
    m = otel.metrics()
    ttft = m["trioflow.run.time_to_first_token"][frozenset()]
    assert (ttft.count, ttft.sum) == (1, 0.25)
    duration = m["trioflow.run.duration"][frozenset()]
    assert duration.sum == result.duration == 1.0
    [model_span] = otel.spans("chat")
    assert model_span.end_time is not None and model_span.start_time is not None
    assert model_span.end_time - model_span.start_time == 1_000_000_000


async def test_dropped_events_of_attached_buses_are_observed() -> None:
    otel = make_otel()
    async with open_event_bus(name="lossy") as bus:
        otel.telemetry.attach(bus)
        async with bus.subscribe(buffer=1, overflow=Overflow.DROP_NEWEST):
            for i in range(5):
                await bus.emit("info", {"message": str(i)})
            assert value(otel.metrics()["trioflow.events.dropped"], bus="lossy") == 4
    # The figure survives the bus.
    assert value(otel.metrics()["trioflow.events.dropped"], bus="lossy") == 4


async def test_detach_stops_listening() -> None:
    otel = make_otel()
    async with open_event_bus() as bus:
        otel.telemetry.attach(bus)
        assert otel.telemetry.detach(bus) is True
        assert otel.telemetry.detach(bus) is False
        await trio.testing.wait_all_tasks_blocked()
        await bus.emit(FlowEvent.token("hi", run_id="r"))
    assert value(otel.metrics()["trioflow.tokens"]) == 0


async def test_events_fed_by_hand_without_a_run_count_but_make_no_spans() -> None:
    otel = make_otel()
    otel.telemetry.handle(FlowEvent.token("a"))
    otel.telemetry.handle(FlowEvent.tool_completed("search", "x", call_id="c", duration=0.5))
    otel.telemetry.handle(FlowEvent.info("ignored"))
    m = otel.metrics()
    assert value(m["trioflow.tokens"]) == 1
    assert value(m["trioflow.tool_calls"], tool="search", outcome="completed") == 1
    assert otel.spans() == []


async def test_the_listener_property_is_the_handler() -> None:
    otel = make_otel()
    async with open_event_bus() as bus:
        bus.add_listener(otel.telemetry.listener)
        await bus.emit(FlowEvent.token("x"))
    assert value(otel.metrics()["trioflow.tokens"]) == 1


def test_handled_types_cover_the_run_lifecycle() -> None:
    assert {"flow.started", "flow.completed", "token.received", "tool.failed"} <= HANDLED_TYPES
    assert "progress.update" not in HANDLED_TYPES


def test_max_runs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_runs"):
        Telemetry(max_runs=0)


# -- spans ------------------------------------------------------------------------------------


def children_of(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_spans_nest_run_iteration_model_and_tool_calls() -> None:
    otel = make_otel()
    result, events = await run_observed(otel.telemetry, Agent(tools=[calculator]))
    spans = otel.spans()
    [run] = otel.spans("trioflow.run")
    assert run.parent is None
    assert run.attributes is not None
    assert run.attributes["trioflow.run_id"] == result.run_id
    assert run.attributes["trioflow.status"] == "completed"
    assert run.status.status_code is StatusCode.OK
    iterations = children_of(spans, run)
    assert [s.name for s in iterations] == ["trioflow.iteration"] * 2
    first, second = sorted(iterations, key=lambda s: s.start_time or 0)
    assert sorted(s.name for s in children_of(spans, first)) == [
        "chat scripted",
        "execute_tool calculator",
    ]
    assert [s.name for s in children_of(spans, second)] == ["chat scripted"]
    [tool_span] = otel.spans("execute_tool")
    tool_started = of_type(events, "tool.started")[0]
    assert tool_span.attributes is not None
    assert tool_span.attributes["gen_ai.tool.call.id"] == tool_started.data["call_id"]
    assert tool_span.attributes["gen_ai.tool.name"] == "calculator"
    assert len(spans) == 6
    assert {s.context.trace_id for s in spans if s.context} == {run.context.trace_id}  # type: ignore[union-attr]
    for span in spans:
        assert span.attributes is not None
        assert span.attributes["trioflow.run_id"] == result.run_id


async def test_span_times_are_the_events_timestamps() -> None:
    otel = make_otel()
    _, events = await run_observed(otel.telemetry, Agent(tools=[calculator]))
    [run] = otel.spans("trioflow.run")
    assert run.start_time == int(of_type(events, "flow.started")[0].timestamp * 1e9)
    assert run.end_time == int(of_type(events, "flow.completed")[0].timestamp * 1e9)
    [tool_span] = otel.spans("execute_tool")
    assert tool_span.start_time == int(of_type(events, "tool.started")[0].timestamp * 1e9)
    assert tool_span.end_time == int(of_type(events, "tool.completed")[0].timestamp * 1e9)


async def test_a_failed_tool_call_span_has_error_status() -> None:
    otel = make_otel()
    await run_observed(
        otel.telemetry, Agent(ScriptedModel(failing_tool_script()), tools=[calculator])
    )
    by_id = {
        s.attributes["gen_ai.tool.call.id"]: s
        for s in otel.spans("execute_tool")
        if s.attributes is not None
    }
    assert by_id["call_ok"].status.status_code is StatusCode.UNSET
    bad = by_id["call_bad"]
    assert bad.status.status_code is StatusCode.ERROR
    assert "division by zero" in (bad.status.description or "")
    assert [e.name for e in bad.events] == ["exception"]


async def test_a_failed_run_marks_run_iteration_and_model_spans_as_errors() -> None:
    otel = make_otel()
    result, _ = await run_observed(
        otel.telemetry,
        Agent(ScriptedModel([Turn("partial answer", fail=ModelError("boom"), fail_after=1)])),
    )
    assert result.status == "failed"
    for name in ("trioflow.run", "trioflow.iteration", "chat"):
        [span] = otel.spans(name)
        assert span.status.status_code is StatusCode.ERROR, name
        assert "ModelError: boom" in (span.status.description or "")
    [run] = otel.spans("trioflow.run")
    assert run.attributes is not None
    assert run.attributes["trioflow.status"] == "failed"
    assert run.attributes["trioflow.tokens"] == 1


async def test_a_cancelled_run_ends_its_open_spans(
    autojump_clock: trio.testing.MockClock,
) -> None:
    otel = make_otel(clock=trio.current_time)
    result, _ = await run_observed(
        otel.telemetry, Agent(ScriptedModel(pace=1.0), tools=[calculator]), timeout=2.5
    )
    assert (result.status, result.reason) == ("cancelled", "timeout")
    [run] = otel.spans("trioflow.run")
    assert run.attributes is not None
    assert run.attributes["trioflow.status"] == "cancelled"
    assert run.attributes["trioflow.reason"] == "timeout"
    assert run.status.status_code is StatusCode.UNSET
    assert run.end_time is not None and run.start_time is not None
    assert run.end_time - run.start_time == 2_500_000_000
    [model_span] = otel.spans("chat")
    assert model_span.attributes is not None
    assert model_span.attributes["trioflow.interrupted"] is True
    assert model_span.end_time == run.end_time
    [iteration] = otel.spans("trioflow.iteration")
    assert iteration.end_time == run.end_time
    assert otel.metrics()["trioflow.iteration.tokens"][frozenset()].count == 1


async def test_model_retries_become_span_events() -> None:
    otel = make_otel()
    turn = Turn("ok", retries=[RetryNotice(1, 0.0, "overloaded", kind="overloaded")])
    await run_observed(otel.telemetry, Agent(ScriptedModel([turn])))
    [model_span] = otel.spans("chat")
    [retry] = [e for e in model_span.events if e.name == "retry"]
    assert retry.attributes is not None
    assert retry.attributes["trioflow.attempt"] == 1


async def test_tracked_runs_are_bounded_and_the_oldest_is_abandoned() -> None:
    otel = make_otel(max_runs=1)
    handle = otel.telemetry.handle
    handle(FlowEvent.flow_started("a", run_id="r1"))
    handle(FlowEvent.iteration_started(1, run_id="r1"))
    handle(FlowEvent.flow_started("b", run_id="r2"))
    abandoned = {s.name: s for s in otel.spans()}
    assert set(abandoned) == {"trioflow.run", "trioflow.iteration"}
    assert abandoned["trioflow.run"].attributes is not None
    assert abandoned["trioflow.run"].attributes["trioflow.abandoned"] is True
    handle(FlowEvent.flow_completed("done", run_id="r2"))
    handle(FlowEvent.flow_completed("done", run_id="r1"))  # untracked now: counted only
    assert value(otel.metrics()["trioflow.runs"], status="completed") == 2
    assert len(otel.spans("trioflow.run")) == 2


async def test_without_an_sdk_the_global_noop_providers_take_everything() -> None:
    telemetry = Telemetry()
    result, _ = await run_observed(telemetry, Agent(tools=[calculator]))
    assert result.ok
    telemetry.record_cache(hit=True, tool="calculator")


# -- Prometheus -------------------------------------------------------------------------------


def parse(text: str) -> dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    families: dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families


async def test_prometheus_text_parses_and_holds_the_figures() -> None:
    prometheus = PrometheusMetrics()
    provider = MeterProvider(metric_readers=[prometheus.reader])
    telemetry = Telemetry(meter_provider=provider, prometheus=prometheus)
    _, events = await run_observed(telemetry, Agent(tools=[calculator]))
    assert prometheus.content_type.startswith("text/plain")
    body = prometheus.render()
    assert isinstance(body, bytes)
    families = parse(body.decode())
    tokens = len(of_type(events, "token.received"))
    assert families["trioflow_tokens"][("trioflow_tokens_total", frozenset())] == tokens
    runs = families["trioflow_runs"]
    assert runs[("trioflow_runs_total", frozenset({("status", "completed")}))] == 1
    duration = families["trioflow_run_duration_seconds"]
    assert duration[("trioflow_run_duration_seconds_count", frozenset())] == 1
    assert duration[("trioflow_run_duration_seconds_bucket", frozenset({("le", "+Inf")}))] == 1
    per_iteration = families["trioflow_iteration_tokens"]
    assert per_iteration[("trioflow_iteration_tokens_sum", frozenset())] == tokens
    assert families["trioflow_runs_active"][("trioflow_runs_active", frozenset())] == 0
    assert "# TYPE trioflow_run_duration_seconds histogram" in prometheus.text()
    provider.shutdown()


async def test_histogram_buckets_are_cumulative() -> None:
    prometheus = PrometheusMetrics()
    provider = MeterProvider(metric_readers=[prometheus.reader])
    telemetry = Telemetry(meter_provider=provider)
    for i, n in enumerate((1, 1, 30)):
        run_id = f"run{i}"
        telemetry.handle(FlowEvent.flow_started("t", run_id=run_id))
        telemetry.handle(FlowEvent.iteration_started(1, run_id=run_id))
        for _ in range(n):
            telemetry.handle(FlowEvent.token("x", run_id=run_id))
        telemetry.handle(FlowEvent.iteration_completed(1, run_id=run_id))
    samples = parse(prometheus.text())["trioflow_iteration_tokens"]

    def bucket(le: str) -> float:
        return samples[("trioflow_iteration_tokens_bucket", frozenset({("le", le)}))]

    assert (bucket("0.0"), bucket("1.0"), bucket("20.0"), bucket("50.0"), bucket("+Inf")) == (
        0,
        2,
        2,
        3,
        3,
    )
    provider.shutdown()


def test_render_prometheus_of_nothing_is_empty() -> None:
    assert render_prometheus(None) == b""


async def test_open_telemetry_with_metrics_serves_prometheus_text() -> None:
    async with open_telemetry(metrics=True) as telemetry:
        assert telemetry.prometheus is not None
        await run_observed(telemetry, Agent(tools=[calculator]))
        families = parse(telemetry.prometheus.text())
        assert (
            families["trioflow_runs"][("trioflow_runs_total", frozenset({("status", "completed")}))]
            == 1
        )


async def test_open_telemetry_without_metrics_has_no_prometheus() -> None:
    async with open_telemetry() as telemetry:
        assert telemetry.prometheus is None
        assert isinstance(telemetry, Telemetry)


async def test_prometheus_renders_from_a_worker_thread_with_the_latest_figures() -> None:
    prometheus = PrometheusMetrics()
    provider = MeterProvider(metric_readers=[prometheus.reader])
    telemetry = Telemetry(meter_provider=provider)
    async with open_event_bus(name="lossy") as bus:
        telemetry.attach(bus)
        async with bus.subscribe(buffer=1, overflow=Overflow.DROP_NEWEST):
            await bus.emit(FlowEvent.flow_started("t", run_id="r"))
            await bus.emit(FlowEvent.token("x", run_id="r"))
            await bus.emit(FlowEvent.flow_completed("x", run_id="r"))  # refreshes the figure
            await trio.testing.wait_all_tasks_blocked()
            text = await trio.to_thread.run_sync(prometheus.text)
    families = parse(text)
    dropped = families["trioflow_events_dropped"]
    assert dropped[("trioflow_events_dropped_total", frozenset({("bus", "lossy")}))] == 2
    assert families["trioflow_tokens"][("trioflow_tokens_total", frozenset())] == 1
    provider.shutdown()


# -- registries: two applications in one process ------------------------------------------------


async def test_two_telemetries_with_metrics_keep_their_figures_apart() -> None:
    import prometheus_client

    async with open_telemetry(metrics=True) as one, open_telemetry(metrics=True) as two:
        assert one.prometheus is not None
        assert two.prometheus is not None
        assert one.prometheus.registry is not two.prometheus.registry
        assert prometheus_client.REGISTRY not in (one.prometheus.registry, two.prometheus.registry)
        await run_observed(one, Agent(tools=[calculator]))
        await run_observed(one, Agent(tools=[calculator]))
        await run_observed(two, Agent(tools=[calculator]))
        completed = ("trioflow_runs_total", frozenset({("status", "completed")}))
        assert parse(one.prometheus.text())["trioflow_runs"][completed] == 2
        assert parse(two.prometheus.text())["trioflow_runs"][completed] == 1
    # Nothing went to the process-wide registry.
    assert "trioflow_runs_total" not in prometheus_client.generate_latest().decode()


async def test_the_registry_is_released_when_the_provider_shuts_down() -> None:
    async with open_telemetry(metrics=True) as telemetry:
        prometheus = telemetry.prometheus
        assert prometheus is not None
        await run_observed(telemetry, Agent(tools=[calculator]))
        assert b"trioflow_runs_total" in prometheus.render()
    assert prometheus.render() == b""


async def test_prometheus_metrics_joins_a_registry_given_to_it() -> None:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("app_requests", "Requests.", registry=registry).inc(3)
    prometheus = PrometheusMetrics(registry=registry)
    provider = MeterProvider(metric_readers=[prometheus.reader])
    await run_observed(Telemetry(meter_provider=provider), Agent(tools=[calculator]))
    families = parse(prometheus.text())
    assert families["app_requests"][("app_requests_total", frozenset())] == 3
    completed = ("trioflow_runs_total", frozenset({("status", "completed")}))
    assert families["trioflow_runs"][completed] == 1
    provider.shutdown()


async def test_render_prometheus_of_a_snapshot_matches_prometheus_metrics() -> None:
    prometheus = PrometheusMetrics()
    snapshot = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[prometheus.reader, snapshot])
    telemetry = Telemetry(meter_provider=provider)
    await run_observed(telemetry, Agent(ScriptedModel(failing_tool_script()), tools=[calculator]))
    telemetry.record_cache(hit=True, tool="calculator")
    exported = prometheus.text()
    rendered = render_prometheus(snapshot.get_metrics_data()).decode()
    assert sorted(exported.splitlines()) == sorted(rendered.splitlines())
    provider.shutdown()


def test_the_instruments_carry_the_package_version() -> None:
    import trioflow
    from trioflow._version import __version__

    assert trioflow.__version__ == __version__
    otel = make_otel()
    otel.telemetry.handle(FlowEvent.flow_started("t", run_id="r"))
    data = otel.reader.get_metrics_data()
    assert data is not None
    scopes = {
        sm.scope.name: sm.scope.version for rm in data.resource_metrics for sm in rm.scope_metrics
    }
    assert scopes == {"trioflow": __version__}


def test_the_version_is_written_once() -> None:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "trioflow/_version.py"
