from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from trioflow import Agent, EventBus, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.builtin import calculator
from trioflow.cache import MemoryCache
from trioflow.services import (
    MemoryStorage,
    ServiceCycleError,
    ServiceManager,
    ServiceNotFound,
    ServiceType,
    Storage,
    current_services,
    open_default_services,
)
from trioflow.settings import Settings
from trioflow.telemetry import Telemetry

# -- helpers ------------------------------------------------------------------------------------


def recording_service(name: str, log: list[str]) -> Any:
    """A factory of an async-context-manager service that logs its enter and exit."""

    @asynccontextmanager
    async def open_service(services: ServiceManager) -> AsyncIterator[str]:
        log.append(f"enter {name}")
        try:
            yield f"<{name}>"
        finally:
            log.append(f"exit {name}")

    return open_service


def depends_on(*names: str, value: Any = "ok") -> Any:
    async def factory(services: ServiceManager) -> Any:
        for name in names:
            await services.get(name)
        return value

    return factory


# -- basics ---------------------------------------------------------------------------------------


def test_service_types_have_the_issue_names() -> None:
    assert {str(t) for t in ServiceType} == {
        "settings",
        "cache",
        "telemetry",
        "tracing",
        "event_manager",
        "flow_executor",
        "storage",
    }


async def test_services_are_created_lazily_with_their_dependencies_first() -> None:
    settings = Settings(cache_size=7, cache_ttl=3.0)
    async with ServiceManager(settings=settings) as services:
        assert services.created == ()
        assert services.has(ServiceType.CACHE)
        cache = await services.get(ServiceType.CACHE)
        assert services.created == ("settings", "cache")
        assert isinstance(cache, MemoryCache)
        assert (cache.max_size, cache.ttl) == (7, 3.0)
        assert await services.get(ServiceType.SETTINGS) is settings


async def test_settings_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOFLOW_PORT", "4321")
    async with ServiceManager() as services:
        assert (await services.get(ServiceType.SETTINGS)).port == 4321


async def test_get_returns_the_same_instance_every_time() -> None:
    async with ServiceManager() as services:
        first = await services.get(ServiceType.STORAGE)
        assert await services.get("storage") is first


async def test_concurrent_gets_create_a_service_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    made: list[object] = []

    async def slow(services: ServiceManager) -> object:
        await trio.sleep(1.0)
        made.append(object())
        return made[-1]

    got: list[object] = []
    async with ServiceManager(defaults=False) as services:
        services.register("slow", slow)

        async def get() -> None:
            got.append(await services.get("slow"))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(get)
    assert len(made) == 1
    assert got == made * 10


async def test_an_unknown_service_raises_ServiceNotFound() -> None:
    async with ServiceManager(defaults=False) as services:
        services.register("known", depends_on())
        with pytest.raises(
            ServiceNotFound, match=r"no service registered as 'nope' \(registered: known\)"
        ):
            await services.get("nope")
        with pytest.raises(KeyError):
            await services.get(ServiceType.CACHE)
        assert not services.has("nope")


async def test_sync_async_and_context_manager_factories() -> None:
    log: list[str] = []
    async with ServiceManager(defaults=False) as services:
        services.register("sync", lambda s: "sync value")
        services.register("async", depends_on(value="async value"))
        services.register("cm", recording_service("cm", log))
        assert await services.get("sync") == "sync value"
        assert await services.get("async") == "async value"
        assert await services.get("cm") == "<cm>"
        assert log == ["enter cm"]
    assert log == ["enter cm", "exit cm"]


async def test_a_failing_factory_keeps_nothing_and_the_next_get_retries() -> None:
    attempts: list[int] = []

    def flaky(services: ServiceManager) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("not yet")
        return "up"

    async with ServiceManager(defaults=False) as services:
        services.register("flaky", flaky)
        with pytest.raises(OSError, match="not yet"):
            await services.get("flaky")
        assert services.created == ()
        assert await services.get("flaky") == "up"


# -- registration -----------------------------------------------------------------------------------


async def test_register_refuses_duplicates_unless_replacing() -> None:
    async with ServiceManager() as services:
        with pytest.raises(ValueError, match="registered as 'cache' already"):
            services.register(ServiceType.CACHE, lambda s: None)
        services.register(ServiceType.CACHE, lambda s: "replaced", replace=True)
        assert await services.get(ServiceType.CACHE) == "replaced"
        with pytest.raises(RuntimeError, match="created already"):
            services.override(ServiceType.CACHE, "too late")


async def test_override_with_an_instance_is_neither_entered_nor_closed() -> None:
    log: list[str] = []
    async with recording_service("mine", log)(None) as value:  # type: ignore[arg-type]
        async with ServiceManager() as services:
            services.override("custom", value)
            assert await services.get("custom") == "<mine>"
        assert log == ["enter mine"]


async def test_override_with_a_factory() -> None:
    async with ServiceManager() as services:
        services.override(ServiceType.STORAGE, factory=lambda s: "fake storage")
        assert await services.get(ServiceType.STORAGE) == "fake storage"


def test_override_needs_exactly_one_of_instance_and_factory() -> None:
    services = ServiceManager()
    with pytest.raises(TypeError, match="not both or neither"):
        services.override("x")
    with pytest.raises(TypeError, match="not both or neither"):
        services.override("x", 1, factory=lambda s: 2)
    with pytest.raises(TypeError, match="service name"):
        services.has("")
    with pytest.raises(TypeError, match="not callable"):
        services.register("x", 42)  # type: ignore[arg-type]


# -- cycles ---------------------------------------------------------------------------------------------


async def test_a_dependency_cycle_is_a_clear_error() -> None:
    async with ServiceManager() as services:
        services.override(ServiceType.SETTINGS, factory=depends_on(ServiceType.CACHE))
        with pytest.raises(ServiceCycleError) as info:
            await services.get(ServiceType.SETTINGS)
        assert str(info.value) == "service dependency cycle: settings -> cache -> settings"
        assert info.value.cycle == ("settings", "cache", "settings")
        assert services.created == ()


async def test_a_service_that_needs_itself_is_a_cycle() -> None:
    async with ServiceManager(defaults=False) as services:
        services.register("ouroboros", depends_on("ouroboros"))
        with pytest.raises(ServiceCycleError, match=r"ouroboros -> ouroboros$"):
            await services.get("ouroboros")


async def test_a_cycle_across_tasks_is_detected_instead_of_deadlocking(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def needs(other: str) -> Any:
        async def factory(services: ServiceManager) -> str:
            await trio.sleep(1.0)  # both tasks are inside their factories by now
            await services.get(other)
            return "never"

        return factory

    errors: list[ServiceCycleError] = []
    async with ServiceManager(defaults=False) as services:
        services.register("a", await needs("b"))
        services.register("b", await needs("a"))

        async def get(name: str) -> None:
            try:
                await services.get(name)
            except ServiceCycleError as exc:
                errors.append(exc)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, "a")
                nursery.start_soon(get, "b")
    assert len(errors) == 2
    assert {e.cycle for e in errors} <= {("a", "b", "a"), ("b", "a", "b")}


# -- lifetime ------------------------------------------------------------------------------------------


async def test_teardown_is_in_reverse_creation_order() -> None:
    log: list[str] = []
    async with ServiceManager(defaults=False) as services:
        for name in ("first", "second", "third"):
            services.register(name, recording_service(name, log))
        services.register("plain", lambda s: "no teardown")
        await services.get("second")
        await services.get("plain")
        await services.get("third")
        await services.get("first")
    assert log == [
        "enter second",
        "enter third",
        "enter first",
        "exit first",
        "exit third",
        "exit second",
    ]


async def test_dependencies_outlive_their_dependents() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def dependent(services: ServiceManager) -> AsyncIterator[str]:
        await services.get("base")
        log.append("enter dependent")
        yield "dependent"
        log.append("exit dependent")

    async with ServiceManager(defaults=False) as services:
        services.register("base", recording_service("base", log))
        services.register("dependent", dependent)
        await services.get("dependent")
        assert services.created == ("base", "dependent")
    assert log == ["enter base", "enter dependent", "exit dependent", "exit base"]


async def test_teardown_order_holds_when_the_block_raises() -> None:
    log: list[str] = []
    with pytest.raises(ZeroDivisionError):
        async with ServiceManager(defaults=False) as services:
            services.register("a", recording_service("a", log))
            services.register("b", recording_service("b", log))
            await services.get("a")
            await services.get("b")
            1 / 0  # noqa: B018
    assert log[-2:] == ["exit b", "exit a"]


async def test_teardown_order_holds_when_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    with trio.move_on_after(1.0) as scope:
        async with ServiceManager(defaults=False) as services:
            services.register("a", recording_service("a", log))
            services.register("b", recording_service("b", log))
            await services.get("a")
            await services.get("b")
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert log == ["enter a", "enter b", "exit b", "exit a"]


async def test_errors_on_exit_are_raised_after_every_service_exited() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def broken(services: ServiceManager) -> AsyncIterator[str]:
        yield "broken"
        raise RuntimeError("could not close")

    with pytest.raises(RuntimeError, match="could not close"):
        async with ServiceManager(defaults=False) as services:
            services.register("a", recording_service("a", log))
            services.register("broken", broken)
            await services.get("a")
            await services.get("broken")
    assert log == ["enter a", "exit a"]


async def test_a_service_that_crashes_fails_the_block() -> None:
    @asynccontextmanager
    async def crashing(services: ServiceManager) -> AsyncIterator[str]:
        async def boom() -> None:
            await trio.lowlevel.checkpoint()
            raise ValueError("service task failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(boom)
            yield "doomed"

    # The service's own nursery wraps its task's error in a group.
    with pytest.RaisesGroup(
        pytest.RaisesExc(ValueError, match="service task failed"), flatten_subgroups=True
    ):
        async with ServiceManager(defaults=False) as services:
            services.register("crashing", crashing)
            await services.get("crashing")
            await trio.sleep_forever()


async def test_get_before_open_and_after_close() -> None:
    services = ServiceManager()
    with pytest.raises(RuntimeError, match="not open"):
        await services.get(ServiceType.SETTINGS)
    async with services:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await services.get(ServiceType.SETTINGS)
    with pytest.raises(RuntimeError, match="only once"):
        async with services:
            pass


# -- the default services ----------------------------------------------------------------------------


def in_memory_telemetry() -> tuple[Telemetry, InMemoryMetricReader, InMemorySpanExporter]:
    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(
        meter_provider=MeterProvider(metric_readers=[reader]), tracer_provider=tracer_provider
    )
    return telemetry, reader, exporter


async def test_the_default_executor_publishes_to_the_event_manager_with_telemetry() -> None:
    telemetry, reader, exporter = in_memory_telemetry()
    seen: list[str] = []
    async with ServiceManager(settings=Settings(history_size=64)) as services:
        services.override(ServiceType.TELEMETRY, telemetry)
        executor = await services.get(ServiceType.FLOW_EXECUTOR)
        bus = await services.get(ServiceType.EVENT_MANAGER)
        assert isinstance(executor, StreamingFlowExecutor)
        assert isinstance(bus, EventBus)
        assert executor.bus is bus
        bus.add_listener(lambda e: seen.append(e.type))
        run = await executor.start(Agent(tools=[calculator]), "What is 25 * 4?")  # no nursery
        result = await run.wait()
        assert result.ok
        assert services.created == ("settings", "telemetry", "event_manager", "flow_executor")
    assert seen[0] == "flow.started"
    assert seen[-1] == "flow.completed"
    data = reader.get_metrics_data()
    assert data is not None
    runs = next(
        m
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "trioflow.runs"
    )
    assert [(dict(p.attributes or {}), p.value) for p in runs.data.data_points] == [  # type: ignore[union-attr]
        ({"status": "completed"}, 1)
    ]
    assert [s.name for s in exporter.get_finished_spans() if s.parent is None] == ["trioflow.run"]


async def test_closing_the_manager_cancels_runs_before_the_bus_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []
    async with ServiceManager(settings=Settings(telemetry=False)) as services:
        executor = await services.get(ServiceType.FLOW_EXECUTOR)
        bus = await services.get(ServiceType.EVENT_MANAGER)
        bus.add_listener(lambda e: seen.append(e.type))
        agent = Agent(ScriptedModel([Turn("a slow answer")], pace=0.1))
        run = await executor.start(agent, "Anything")
        await trio.sleep(1.0)
    assert run.done
    assert seen[-1] == "flow.cancelled"  # the bus was still open for the terminal event


async def test_telemetry_setting_off_leaves_the_bus_unobserved() -> None:
    async with ServiceManager(settings=Settings(telemetry=False)) as services:
        bus = await services.get(ServiceType.EVENT_MANAGER)
        assert bus.statistics().listeners == ()
        assert "telemetry" not in services.created


async def test_tracing_is_the_telemetry_tracer() -> None:
    telemetry, _, _ = in_memory_telemetry()
    async with ServiceManager() as services:
        services.override(ServiceType.TELEMETRY, telemetry)
        assert await services.get(ServiceType.TRACING) is telemetry.tracer


async def test_the_default_telemetry_serves_prometheus_when_metrics_are_on() -> None:
    async with ServiceManager(settings=Settings(metrics=True)) as services:
        executor = await services.get(ServiceType.FLOW_EXECUTOR)
        result = await executor.run(Agent(tools=[calculator]), "What is 25 * 4?")
        assert result.ok
        telemetry = await services.get(ServiceType.TELEMETRY)
        assert telemetry.prometheus is not None
        await trio.testing.wait_all_tasks_blocked()  # the telemetry listener caught up
        text = telemetry.prometheus.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sample] = families["trioflow_runs"].samples
    assert (sample.labels, sample.value) == ({"status": "completed"}, 1)


async def test_default_storage() -> None:
    async with ServiceManager() as services:
        storage = await services.get(ServiceType.STORAGE)
        assert isinstance(storage, Storage)
        assert isinstance(storage, MemoryStorage)
        await storage.set("runs/1", {"status": "completed"})
        await storage.set("runs/2", None)
        await storage.set("other", 3)
        assert await storage.get("runs/1") == {"status": "completed"}
        assert await storage.get("missing", "default") == "default"
        assert await storage.keys("runs/") == ["runs/1", "runs/2"]
        assert await storage.delete("runs/2") is True
        assert await storage.delete("runs/2") is False
        with pytest.raises(TypeError):
            await storage.set(1, "x")  # type: ignore[arg-type]


# -- the process-wide default ---------------------------------------------------------------------------


async def test_current_services_outside_a_default_raises_clearly() -> None:
    with pytest.raises(RuntimeError, match="open_default_services"):
        current_services()


async def test_open_default_services_sets_and_clears_the_default() -> None:
    async with open_default_services(settings=Settings(port=1234)) as services:
        assert current_services() is services
        assert (await current_services().get(ServiceType.SETTINGS)).port == 1234
        with pytest.raises(RuntimeError, match="open already"):
            async with open_default_services():
                pass

        async def in_another_task() -> None:
            assert current_services() is services

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_another_task)
    with pytest.raises(RuntimeError):
        current_services()
